"""
How a twistd process ends: the first SIGTERM or SIGINT stops the reactor, the
second ends the process at once; and its exit status (twistd always exits 0).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable


class StopSignals:
    """C{on_first(name)} before the reactor stops; C{on_second(name)} at a later signal, to end."""

    def __init__(self, reactor, on_first: Callable[[str], None], on_second: Callable[[str], None]):
        self._reactor, self._on_first, self._on_second = reactor, on_first, on_second
        self.seen, self.installed = 0, False

    def install(self) -> None:
        """Replace the reactor's SIGTERM and SIGINT handlers, if it installed any (C{installed})."""
        # A reactor that handles signals always sets SIGTERM's.
        if not callable(signal.getsignal(signal.SIGTERM)):
            return
        self.installed = True
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._received)

    def _received(self, number, frame) -> None:
        self.seen += 1
        name = signal.Signals(number).name
        if self.seen == 1:
            self._on_first(name)
            self._reactor.callFromThread(self._stop_reactor)
        else:
            self._on_second(name)

    def _stop_reactor(self) -> None:
        if self._reactor.running:
            self._reactor.stop()


_exit_code = 0


def set_exit_code(code: int) -> None:
    """Make the process exit with C{code} (L{end_at_exit} applies it; twistd always exits 0)."""
    global _exit_code
    _exit_code = code


def end_at_exit(reactor) -> None:
    """
    At interpreter exit, after the other handlers, exit with L{set_exit_code}'s status; after a
    clean stop, skip the finalisation (0.4-0.5 s of CPU freeing a Django site, as gunicorn's
    children do). An uncaught exception with no status set, or no stop yet, is Python's.
    """
    stopped = []
    reactor.addSystemEventTrigger("after", "shutdown", stopped.append, True)

    def end() -> None:
        if _exit_code or (stopped and not hasattr(sys, "last_value")):
            flush_everything()
            os._exit(_exit_code)

    # atexit runs the last registered first: registered before Django is set
    # up, this runs after the site's handlers; flush_everything does logging's.
    atexit.register(end)


def flush_everything() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


def write_stderr(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, text.encode("utf-8", "replace"))
