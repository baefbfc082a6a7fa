"""
stdlib logging in the server's processes, without Twisted (job worker
processes import this module, and Twisted would cost each of them ~15 MiB):
Django's console handler that would print a line twice, and the lines a
job worker writes for its records, which the job service reads back as
log events of the record's level and logger (L{twistedlrp.jobs.workers.worker}).

A worker's record is one line on its standard error, readable in the job's
output too::

    WARNING myapp.jobs: the report has no rows

(a traceback follows on the next lines, as text).
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
_NAMES = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error"}


def drop_django_console() -> int:
    """
    Remove Django's own console handler (C{DEFAULT_LOGGING}'s C{console}:
    standard error, when C{DEBUG}) from the loggers that propagate to a
    root handler of twistedlrp's (the server log's bridge, a worker's
    L{install_worker_handler}): their records reach the log through it and
    would otherwise be printed twice. Call it after C{django.setup()}, which
    installs the handler.

    @return: how many handlers were removed.
    """
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


class _WorkerHandler(logging.StreamHandler):
    """A worker's records on its standard error, one L{_RECORD} line each."""

    _twistedlrp = True

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def install_worker_handler() -> None:
    """
    In a job worker: write stdlib records of the server's C{--log-level}
    (L{LEVEL_VARIABLE}, C{warn} without it) and above to standard error,
    one line each that the job service logs at the record's level, unless
    the site's C{LOGGING} gave the root logger handlers of its own. Call it
    after C{django.setup()}.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    number = NUMBERS.get(os.environ.get(LEVEL_VARIABLE, ""), logging.WARNING)
    handler = _WorkerHandler()
    handler.setLevel(number)
    root.addHandler(handler)
    if root.level > number or root.level == logging.NOTSET:
        root.setLevel(number)
    drop_django_console()


def parse_record(line: str) -> tuple[str, str, str] | None:
    """
    @return: C{(level, logger name, message)} of a worker's record line
        (C{level} as C{--log-level} names it, C{critical} too), or C{None}
        for any other line.
    """
    match = _RECORD.match(line)
    if match is None:
        return None
    level, name, message = match.groups()
    return _NAMES.get(level, "critical"), name, message
