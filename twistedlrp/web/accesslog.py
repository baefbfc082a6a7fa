"""
The access log (C{--access-log}): one line in combined log format per
response (with C{ rt=SECONDS} under C{combined+duration}), to a file
flushed each second, or with C{-} to the server's log under
C{twistedlrp.access}. A file the server creates has mode 0640 (client
addresses are personal data); a C{token=} value in the target or the
referrer (the job progress streams' tokens) is masked.
"""

from __future__ import annotations

import functools
import os
import re
import time

from twisted.internet import task
from twisted.logger import Logger
from twisted.web.http import datetimeToLogString

_log = Logger(namespace="twistedlrp.access")
# The time stamp of the second (twisted.web's own log keeps one too).
_log_time = functools.lru_cache(maxsize=1)(datetimeToLogString)

# The mode of an access log file the server creates (before the umask).
FILE_MODE = 0o640
# A query parameter named token (any case), up to the end of its value.
_TOKEN = re.compile(r"([?&;]token=)[^&;#\s]*", re.IGNORECASE)


class AccessLog:
    """Where the access lines of one site go; see the module docstring."""

    def __init__(self, reactor, path: str | None, log_format: str = "combined"):
        self.reactor = reactor
        self.path = path
        self.with_duration = log_format == "combined+duration"
        self._file = None
        self._flusher = None

    def open(self) -> None:
        """Open the log file (once)."""
        if self.path and self.path != "-" and self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
            self._flusher = task.LoopingCall(self._file.flush)
            self._flusher.clock = self.reactor
            self._flusher.start(1, now=False)

    def close(self) -> None:
        """Flush and close the log file (at shut-down); idempotent."""
        if self._file is not None:
            self._flusher.stop()
            self._file.close()
            self._file = None

    def write(self, request) -> None:
        """Log the response to C{request}, finished now."""
        if not self.path:
            return
        line = '{} - - {} "{} {} {}" {} {} "{}" "{}"'.format(
            request.client or "-",
            _log_time(int(self.reactor.seconds())),
            quote(request.method),
            masked(request.uri),
            quote(request.clientproto),
            request.code,
            request.sentLength or "-",
            masked(request.getHeader(b"referer") or "-"),
            quote(request.getHeader(b"user-agent") or "-"),
        )
        duration = time.monotonic() - request.arrived
        if self.with_duration:
            line += f" rt={duration:.3f}"
        if self._file is not None:
            self._file.write(line + "\n")
        elif self.path == "-":
            # The fields are for --log-format json.
            _log.info(
                "{log_text}",
                log_text=line,
                client=request.client or None,
                method=quote(request.method),
                uri=masked(request.uri),
                status=request.code,
                bytes=request.sentLength,
                duration=round(duration, 6),
            )


def quote(value: bytes | str | None) -> str:
    """@return: C{value} as text for a quoted field of the combined format."""
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.replace("\\", "\\\\").replace('"', '\\"')


def mask_tokens(text: str) -> str:
    """@return: C{text} with the value of each C{token=} query parameter masked."""
    return _TOKEN.sub(r"\1[masked]", text) if "=" in text else text


def masked(value: bytes | str) -> str:
    """@return: C{value} quoted, as the access log shows it (its tokens masked)."""
    return mask_tokens(quote(value))
