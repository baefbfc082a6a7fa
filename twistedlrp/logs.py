"""
The server log's level and format, for twisted.logger events and stdlib records
alike (docs/logging.md): every process but the job workers logs through it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogBeginner,
)
from twisted.python import usage
from twisted.python.logfile import LogFile

from twistedlrp import values
from twistedlrp.stdlog import NUMBERS as _STDLIB
from twistedlrp.stdlog import add_root_handler, drop_django_console  # noqa: F401 (also here)

LEVELS = {name: LogLevel.levelWithName(name) for name in ("debug", "info", "warn", "error")}
_RANK = {level: rank for rank, level in enumerate([*LEVELS.values(), LogLevel.critical])}
# Keys of events from twisted.python.log (legacy) that repeat what the fixed fields say.
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "why", "failure"})

# This process's threshold, for callers that skip building a filtered event.
_threshold = _RANK[LogLevel.info]
_level_name = "info"

# The parsers of --log-level, --log-format and --access-log-format.
log_level = values.choice(*LEVELS, aliases={"warning": "warn"})
log_format = values.choice("text", "json")
access_log_format = values.choice("combined", "combined+duration")


def set_level(name: str) -> None:
    global _threshold, _level_name
    _threshold = _RANK[LEVELS[name]]
    _level_name = name


def level_name() -> str:
    """@return: this process's level (L{set_level}), C{info} by default."""
    return _level_name


def enabled(level: LogLevel) -> bool:
    """@return: whether an event of C{level} is written (hot paths skip building it if not)."""
    return _RANK[level] >= _threshold


def json_line(event: dict) -> str:
    """@return: the event as one line of JSON (time, level, namespace, message, pid, fields)."""
    when, level = event.get("log_time"), event.get("log_level")
    if when is not None:
        when = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    # Formatted by its caller (job lines, stdlib records): Twisted's formatter costs 0.1 ms.
    message = event.get("log_text")
    if event.get("log_format") != "{log_text}" or not isinstance(message, str):
        message = formatEvent(event)
    record = {
        "time": when,
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace") or event.get("log_system") or "-",
        "message": message,
        "pid": os.getpid(),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    # A field the whole message is made of ("{line}") would only repeat it.
    alone = event.get("log_format")
    fields = {
        key: value
        for key, value in event.items()
        if not key.startswith("log_")
        and key not in _LEGACY_KEYS
        and key not in record
        and alone != "{" + key + "}"
    }
    record.update(fields)
    try:
        return json.dumps(record, ensure_ascii=False, default=str) + "\n"
    except (TypeError, ValueError):
        # A field json cannot take even as text (keys that are not strings).
        record.update({key: repr(value) for key, value in fields.items()})
        return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def text_line(event: dict) -> str | None:
    """@return: the event as twistd writes it (C{2026-12-01T10:20:23+0000 [namespace#level] text})."""
    text = event.get("log_text")
    level = event.get("log_level")
    if (
        event.get("log_format") == "{log_text}"
        and isinstance(text, str)
        and level is not None
        and "log_failure" not in event
        and "log_system" not in event
    ):
        # What Twisted's formatter would make of it (job, access and stdlib lines), for less.
        namespace = event.get("log_namespace", "-")
        when = _second_time(event.get("log_time"))
        return f"{when} [{namespace}#{level.name}] {text}\n".replace("\n", "\n\t", text.count("\n"))
    return formatEventAsClassicLogText(event, formatTime=_second_time)


# twistd's time stamps have whole seconds: each is formatted once.
_format_second = functools.lru_cache(maxsize=1)(formatTime)


def _second_time(when: float | None) -> str:
    return _format_second(None if when is None else int(when))


def make_observer(stream, log_format: str = "text", level: str = "info") -> ILogObserver:
    """@return: an observer writing the events of C{level} and above to C{stream}, text or JSON."""
    observer = FileLogObserver(stream, json_line if log_format == "json" else text_line)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(LEVELS[level])])


def twistd_log_file(twistd_options):
    """@return: the file twistd logs to (rotated on SIGUSR1), or C{None} for its own (syslog)."""
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    name = twistd_options.get("logfile") or ""
    nodaemon = twistd_options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        return sys.stdout if nodaemon else None
    from twisted.internet import reactor

    log_file = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(log_file.rotate))
    return log_file


def observe_for_twistd(root, options) -> None:
    """Have twistd log through L{make_observer} (not a C{.tac}'s options: twistd's are absent)."""
    set_level(options["log-level"])
    twistd_options = getattr(options, "parent", None)
    if twistd_options is None:
        return
    stream = twistd_log_file(twistd_options)
    if stream is None:
        return
    observer = make_observer(stream, options["log-format"], options["log-level"])
    attach = root.setServiceParent

    # twistd makes the application after makeService returns and only then
    # calls this, then starts logging: the one moment to set the component.
    def setServiceParent(parent):
        getter = getattr(parent, "getComponent", None)
        if getter is not None and getter(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, observer)
        return attach(parent)

    root.setServiceParent = setServiceParent


def begin(lrp_args: list[str], stream) -> None:
    """Begin logging to C{stream} in a process that is not twistd, as C{lrp_args} say."""
    from twistedlrp.options import Options

    level, log_format = "info", "text"
    # The main process checked them; this process reports its own errors later.
    with contextlib.suppress(usage.UsageError, SystemExit, OSError, ValueError):
        options = Options()
        options.parseOptions(list(lrp_args))
        level, log_format = options["log-level"], options["log-format"]
    set_level(level)
    observer = make_observer(stream, log_format, level)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


_FROM_STDLIB = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


class _Bridge(logging.Handler):
    """Hands stdlib records to twisted.logger, under the record's logger name."""

    def emit(self, record):
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            found = (ours for at, ours in _FROM_STDLIB if record.levelno >= at)
            Logger(namespace=record.name).emit(
                next(found, LogLevel.debug), "{log_text}", log_text=text
            )
        except Exception:
            self.handleError(record)


def bridge_stdlib_logging(level: str = "warn") -> None:
    """Send stdlib records of C{level} and above to the server log (one root handler)."""
    ours = (h for h in logging.getLogger().handlers if getattr(h, "_twistedlrp", False))
    add_root_handler(next(ours, None) or _Bridge(), _STDLIB[level])
