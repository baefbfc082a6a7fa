"""
stdlib logging without Twisted (a job worker would pay ~15 MiB for it): a worker
writes its records on stderr (C{WARNING myapp.jobs: text}); the service logs them.
"""

from __future__ import annotations

import logging
import os
import re
import sys

# The environment variable that tells a job worker the server's --log-level.
LEVEL_VARIABLE = "LRP_LOG_LEVEL"
NUMBERS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
# The first line of a worker's record: level, logger name, message.
_RECORD = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.\-]{1,200}): (.*)\Z", re.S)


def drop_django_console() -> int:
    """Remove Django's C{console} handlers that print what ours do; @return: how many."""
    root = logging.getLogger()
    if not any(getattr(h, "_twistedlrp", False) for h in root.handlers):
        return 0
    from django.utils.log import RequireDebugTrue

    removed = 0
    # Placeholders (names only their children have) have no handlers.
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or not _propagates_to_root(logger):
            continue
        for handler in list(logger.handlers):
            if (
                type(handler) is logging.StreamHandler
                and handler.name == "console"
                and any(isinstance(f, RequireDebugTrue) for f in handler.filters)
            ):
                logger.removeHandler(handler)
                removed += 1
    return removed


def _propagates_to_root(logger: logging.Logger) -> bool:
    while logger is not None and logger is not logging.root:
        if not logger.propagate:
            return False
        logger = logger.parent
    return True


def install_worker_handler() -> None:
    """In a job worker: records of the server's C{--log-level} to stderr (unless LOGGING did)."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    add_root_handler(handler, NUMBERS.get(os.environ.get(LEVEL_VARIABLE, ""), logging.WARNING))
    drop_django_console()


def add_root_handler(handler: logging.Handler, number: int) -> None:
    """Give the root logger C{handler} (once) for records of level C{number} and above."""
    handler._twistedlrp = True  # (L{drop_django_console})
    handler.setLevel(number)
    root = logging.getLogger()
    if handler not in root.handlers:
        root.addHandler(handler)
    if root.level > number or root.level == logging.NOTSET:
        root.setLevel(number)


def parse_record(line: str) -> tuple[str, str, str] | None:
    """@return: C{(level, logger name, message)} of a worker's record line, or C{None}."""
    match = _RECORD.match(line)
    if match is None:
        return None
    level, name, message = match.groups()
    return "warn" if level == "WARNING" else level.lower(), name, message
