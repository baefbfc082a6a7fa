"""
The limits of the HTTP side (docs/serving.md, "Limits"): their defaults
(the options'), the default C{--max-connections} sized to the open-file
limit, and the short answers a refused connection gets.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field

from twistedlrp.options import OPTIONS

_DEFAULT = {option.name: option.default for option in OPTIONS}
WRITE_TIMEOUT = _DEFAULT["write-timeout"]
# Bytes the kernel may hold unsent for a TCP client (TCP_NOTSENT_LOWAT; else megabytes):
# the write deadline starts soon after a client stops reading, a fast one not slowed.
UNSENT_LOWAT = 128 * 1024
# The default --max-connections is the soft open-file limit less what the
# rest of the process may need: FD_RESERVE for sockets, logs, the reactor,
# outbound HTTP, static files and imports; FD_PER_THREAD for a pool thread's
# database connection (SQLite in WAL mode holds 3 files); FD_PER_WORKER for
# a worker's 5 pipes, twice (a recycled worker overlaps its successor).
FD_RESERVE = 128
FD_PER_THREAD = 4
FD_PER_WORKER = 10
# Seconds a refused or timed-out client has to read our short answer.
ANSWER_SECONDS = 5.0
# 503 answers (every connection busy) sent at once at most; beyond, none.
MAX_BUSY_ANSWERS = 32
# Seconds between two warnings that connections or streams were refused.
FULL_WARNING_INTERVAL = 60.0


def default_max_connections(threads: int, workers: int, limit: int | None = None) -> int:
    """@return: the default C{--max-connections}: the open-file C{limit} less the reserves."""
    if limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = 2**20 if soft == resource.RLIM_INFINITY or soft > 2**20 else soft
    reserve = FD_RESERVE + FD_PER_THREAD * threads + FD_PER_WORKER * workers
    return max(limit - reserve, limit // 2, 1)


def default_stream_threads(threads: int) -> int:
    """@return: the default C{--stream-threads}: half the pool (the rest answers short requests)."""
    return max(threads // 2, 1)


@dataclass(frozen=True)
class Limits:
    """The limits of the HTTP side (docs/serving.md). A timeout of 0 means none."""

    header_timeout: float = _DEFAULT["header-timeout"]
    max_header_size: int = _DEFAULT["max-header-size"]
    max_headers: int = 500  # header lines in one request head (twisted.web's own cap)
    max_connections: int = field(default_factory=lambda: default_max_connections(8, 2))
    write_timeout: float = WRITE_TIMEOUT
    stream_threads: int = field(default_factory=lambda: default_stream_threads(8))

    @classmethod
    def from_options(cls, options) -> Limits:
        """@return: the limits that the C{twistd lrp} C{options} set."""
        max_connections = options["max-connections"]
        if not max_connections:
            runs_workers = not (options["no-jobs"] or options["jobs-connect"])
            workers = options["workers"] if runs_workers else 0
            max_connections = default_max_connections(options["threads"], workers)
        return cls(
            header_timeout=options["header-timeout"],
            max_header_size=options["max-header-size"],
            max_connections=max_connections,
            write_timeout=options["write-timeout"],
            stream_threads=options["stream-threads"] or default_stream_threads(options["threads"]),
        )


class StreamSlots:
    """
    The pool threads that may stream a response at once (C{--stream-threads}); beyond,
    503. C{refused}: the responses answered 503 for want of a slot, so far.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.taken = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._warned_at: float | None = None

    def take(self) -> bool:
        with self._lock:
            if self.taken >= self.limit:
                self.refused += 1
                return False
            self.taken += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.taken -= 1

    def should_warn(self) -> bool:
        """@return: whether to warn about a refusal now (at most once a minute)."""
        now = time.monotonic()
        with self._lock:
            if self._warned_at is not None and now - self._warned_at < FULL_WARNING_INTERVAL:
                return False
            self._warned_at = now
            return True


def short_answer(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A whole response that ends the connection (written straight to the transport)."""
    head = b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
    return head % (status, len(body)) + extra + b"Connection: close\r\n\r\n" + body
