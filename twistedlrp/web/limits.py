"""
The limits of the HTTP side (docs/serving.md, "Limits"): their defaults,
the default C{--max-connections} sized to the open-file limit, and the
short answers a refused connection gets.
"""

from __future__ import annotations

import resource as _resource
import threading
import time
from dataclasses import dataclass, field

from twistedlrp.options import OPTIONS

# The defaults of the limits are the options' (docs/serving.md).
_DEFAULT = {option.name: option.default for option in OPTIONS}
HEADER_TIMEOUT = _DEFAULT["header-timeout"]
MAX_HEADER_SIZE = _DEFAULT["max-header-size"]
MAX_HEADERS = 500  # header lines in one request head (twisted.web's own cap)
WRITE_TIMEOUT = _DEFAULT["write-timeout"]
# Bytes the kernel may hold for a TCP client beyond what its window lets out
# (TCP_NOTSENT_LOWAT; without it, megabytes): the write deadline starts soon
# after a client stops reading, and a fast one is not slowed down.
UNSENT_LOWAT = 128 * 1024
# The default --max-connections is the soft open-file limit minus what the
# rest of the process may need at once: FD_RESERVE for the listening and
# job-service sockets, logs, the reactor's own descriptors, outbound HTTP,
# static files being sent and imports; FD_PER_THREAD for each pool thread's
# database connection (SQLite in WAL mode holds 3 files); FD_PER_WORKER for
# each worker's 5 pipes, twice (a recycled worker overlaps its successor).
FD_RESERVE = 128
FD_PER_THREAD = 4
FD_PER_WORKER = 10
# Seconds a refused or timed-out client has to read our short answer.
ANSWER_SECONDS = 5.0
# 503 answers (connection limit, every connection busy) sent at once at most;
# beyond, a new connection is closed without one.
MAX_BUSY_ANSWERS = 32
# Seconds between two warnings that the connection limit is reached, or
# that streams were refused a thread.
FULL_WARNING_INTERVAL = 60.0


def open_file_limit() -> int:
    """@return: the soft C{RLIMIT_NOFILE} of the process (2**20 if unlimited)."""
    soft, _ = _resource.getrlimit(_resource.RLIMIT_NOFILE)
    if soft == _resource.RLIM_INFINITY or soft > 2**20:
        return 2**20
    return soft


def default_max_connections(threads: int, workers: int, limit: int | None = None) -> int:
    """
    @return: the default C{--max-connections}: the open-file C{limit} (the
        process's soft limit by default) minus C{FD_RESERVE}, minus
        C{FD_PER_THREAD} per pool thread and C{FD_PER_WORKER} per worker
        process; at least half the limit.
    """
    if limit is None:
        limit = open_file_limit()
    reserve = FD_RESERVE + FD_PER_THREAD * threads + FD_PER_WORKER * workers
    return max(limit - reserve, limit // 2, 1)


def default_stream_threads(threads: int) -> int:
    """
    @return: the default C{--stream-threads}: half the pool's C{threads}
        (at least one), so that the other half answers short requests
        whatever the streams do.
    """
    return max(threads // 2, 1)


@dataclass(frozen=True)
class Limits:
    """
    The limits of the HTTP side (docs/serving.md, "Limits"). A timeout of 0
    means none.
    """

    header_timeout: float = HEADER_TIMEOUT
    max_header_size: int = MAX_HEADER_SIZE
    max_headers: int = MAX_HEADERS
    max_connections: int = field(default_factory=lambda: default_max_connections(8, 2))
    write_timeout: float = WRITE_TIMEOUT
    stream_threads: int = field(default_factory=lambda: default_stream_threads(8))

    @classmethod
    def from_options(cls, options) -> Limits:
        """@return: the limits that the C{twistd lrp} C{options} set."""
        max_connections = options.get("max-connections")
        if not max_connections:
            runs_workers = not (options.get("no-jobs") or options.get("jobs-connect"))
            workers = options.get("workers", 0) if runs_workers else 0
            max_connections = default_max_connections(options.get("threads", 8), workers)
        return cls(
            header_timeout=options.get("header-timeout", HEADER_TIMEOUT),
            max_header_size=options.get("max-header-size", MAX_HEADER_SIZE),
            max_connections=max_connections,
            write_timeout=options.get("write-timeout", WRITE_TIMEOUT),
            stream_threads=options.get("stream-threads")
            or default_stream_threads(options.get("threads", 8)),
        )


class StreamSlots:
    """
    How many pool threads may stream a response at once (C{--stream-threads}).
    A response that would stream beyond is answered 503 before its head
    is sent. Used from the pool threads.

    @ivar taken: threads streaming now.
    @ivar refused: responses answered 503 for want of a slot, so far.
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
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
        + body
    )
