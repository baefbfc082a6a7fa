"""
``twistd lrp``: the options and the service maker behind the dropin in
``twisted/plugins/twistedlrp_plugin.py``.

A process that runs servers on another's behalf (the reload supervisor's
child, L{twistedlrp.reload.server_main}) wraps every build with L{wrap_builds}
instead of replacing L{makeService}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import IService

from twistedlrp.options import TapOptions as Options

__all__ = ["Options", "makeService", "wrap_builds"]

# (build, options) -> service; build() makes the service L{makeService} would.
BuildWrapper = Callable[[Callable[[], IService], Options], IService]
_wrapper: BuildWrapper | None = None


def wrap_builds(wrapper: BuildWrapper | None) -> None:
    """
    Route every later L{makeService} through C{wrapper(build, options)},
    which must call C{build()} and return (or replace) its service; C{None}
    removes it.
    """
    global _wrapper
    _wrapper = wrapper


def makeService(options) -> IService:
    """
    Set Django up and build the server's service tree (or, with
    C{--reload}, the supervisor that runs the server as a child).

    A failure ends the process with a one-line error and exit code 1.
    """

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
