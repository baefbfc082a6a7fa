"""``twistd lrp``: the options and the service maker of the ``lrp`` dropin."""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import IService

from twistedlrp.options import TapOptions as Options

__all__ = ["Options", "makeService", "wrap_builds"]

# (build, options) -> service; build() makes the service L{makeService} would.
BuildWrapper = Callable[[Callable[[], IService], Options], IService]
_wrapper: BuildWrapper | None = None


def wrap_builds(wrapper: BuildWrapper | None) -> None:
    """Route every later L{makeService} through C{wrapper} (the reload child's report)."""
    global _wrapper
    _wrapper = wrapper


def makeService(options) -> IService:
    """Set Django up and build the server (a failure ends the process with one line)."""
    from twisted.internet import reactor

    from twistedlrp.signals import end_at_exit

    end_at_exit(reactor)

    def build() -> IService:
        from twistedlrp import _service_from_options
        from twistedlrp.boot import BootError

        try:
            return _service_from_options(options)
        except BootError as e:
            raise SystemExit(f"twistd lrp: error: {e}") from None

    from twistedlrp import logs

    root = _wrapper(build, options) if _wrapper is not None else build()
    logs.observe_for_twistd(root, options)
    return root
