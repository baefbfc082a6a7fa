"""``twistd lrp``: the options and the service maker of the ``lrp`` dropin."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable

from twisted.application.service import IService

from twistedlrp.options import TapOptions as Options

__all__ = ["Options", "makeService", "wrap_builds"]

# (build, options) -> service; build() makes the service L{makeService} would.
BuildWrapper = Callable[[Callable[[], IService], Options], IService]
_wrapper: BuildWrapper | None = None


def wrap_builds(wrapper: BuildWrapper | None) -> None:
    """
    Route every later L{makeService} through C{wrapper(build, options)}, which
    returns (or replaces) C{build()}'s service (the reload child's report).
    """
    global _wrapper
    _wrapper = wrapper


def _end_after_clean_stop(reactor) -> None:
    """
    Once the reactor stopped after every service did (logs flushed, files
    closed), end the process at interpreter exit without its finalisation:
    freeing every module and object of a Django site costs 0.4-0.5 s of
    CPU and changes nothing (gunicorn's and multiprocessing's children end
    the same way). Any other way out (a failed start, an exception) keeps
    Python's own exit.
    """
    stopped = []
    reactor.addSystemEventTrigger("after", "shutdown", stopped.append, True)

    def end() -> None:
        from twistedlrp import signals

        # sys.last_value: an exception that reached the top after the stop
        # (its exit status 1 is Python's to give).
        if stopped and not hasattr(sys, "last_value"):
            signals.flush_everything()
            os._exit(signals._exit_code)

    # atexit runs its handlers last registered first: this one, registered
    # before Django's and the job service's, runs after theirs (weakref
    # finalizers among them); logging's, registered before it, is what
    # flush_everything does.
    atexit.register(end)


def makeService(options) -> IService:
    """Set Django up and build the server (a failure ends the process with one line)."""
    from twisted.internet import reactor

    _end_after_clean_stop(reactor)

    def build() -> IService:
        from twistedlrp import _service_from_options
        from twistedlrp.boot import BootError

        try:
            return _service_from_options(options)
        except BootError as e:
            raise SystemExit(f"twistd lrp: error: {e}") from None

    from twistedlrp import logs

    root = _wrapper(build, options) if _wrapper is not None else build()
    # The server log's level and format (--log-level, --log-format), on
    # the file twistd chose (-n, --logfile).
    logs.observe_for_twistd(root, options)
    return root
