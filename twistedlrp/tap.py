"""``twistd lrp``: the options and the service maker of the ``lrp`` dropin."""

from __future__ import annotations

from twisted.application.service import IService

from twistedlrp import _service_from_options, logs
from twistedlrp.boot import BootError
from twistedlrp.options import TapOptions as Options
from twistedlrp.signals import end_at_exit

__all__ = ["Options", "makeService", "wrap_builds"]

_wrapper = None


def wrap_builds(wrapper) -> None:
    """Make every later L{makeService} return C{wrapper(build, options)} (the reload child's)."""
    global _wrapper
    _wrapper = wrapper


def makeService(options) -> IService:
    """Set Django up and build the server (a failure ends the process with one line)."""
    from twisted.internet import reactor

    end_at_exit(reactor)

    def build() -> IService:
        try:
            return _service_from_options(options)
        except BootError as e:
            raise SystemExit(f"twistd lrp: error: {e}") from None

    root = _wrapper(build, options) if _wrapper is not None else build()
    logs.observe_for_twistd(root, options)
    return root
