"""
The site's start-up and shut-down hooks and long-lived services (docs/hooks.md).
Start-up hooks run in order before any port opens; shut-down hooks in reverse
once requests and jobs have drained. A hook's Deferred or coroutine is awaited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer

from twistedlrp.ordered_service import OrderedService, StartupFailed

_startup_hooks: list[Callable[[], Any]] = []
_shutdown_hooks: list[Callable[[], Any]] = []
_services: dict[str, _Named] = {}  # in registration order
_serving: SiteServices | None = None  # the server's, once it is built
_once: set[int] = set()  # ids of the hooks registered with once=True


class SiteServices(OrderedService):
    """The server's registered services of C{scope} (L{in_scope}); one registered later joins."""

    name = "site-services"

    def __init__(self, scope: str = "all"):
        global _serving
        super().__init__()
        self.scope = scope
        _serving = self
        for named in _services.values():
            self.take(named)

    def take(self, named: _Named) -> None:
        if in_scope(self.scope, named.once):
            self.addService(named)


def _register(hooks: list, hook, once: bool, what: str):
    def register(hook):
        if not callable(hook):
            raise TypeError(f"{what} expects a callable, got {hook!r}")
        if hook not in hooks:
            hooks.append(hook)
        if once:
            _once.add(id(hook))
        return hook

    return register if hook is None else register(hook)


def on_startup(hook: Callable[[], Any] | None = None, *, once: bool = False):
    """
    Register C{hook} to run at server start (C{@on_startup}); @return: C{hook}, or a decorator.
    @param once: with C{--web-workers} above 1, run it in the main process, not in each web one.
    """
    return _register(_startup_hooks, hook, once, "on_startup")


def on_shutdown(hook: Callable[[], Any] | None = None, *, once: bool = False):
    """Register C{hook} to run at server stop, once requests and jobs drained (as L{on_startup})."""
    return _register(_shutdown_hooks, hook, once, "on_shutdown")


def add_service(name: str, svc: service.IService, *, once: bool = False) -> service.IService:
    """
    Start and stop C{svc} with the server (C{once} as for L{on_startup}); @return: C{svc}.
    @raise ValueError: the name is taken. @raise TypeError: C{svc} is no L{IService}.
    """
    if not service.IService.providedBy(svc):
        raise TypeError(f"add_service({name!r}): {svc!r} does not provide IService")
    if name in _services:
        raise ValueError(f"a service named {name!r} is registered already")
    _services[name] = named = _Named(name, svc, once)
    if _serving is not None:
        _serving.take(named)
    return svc


def in_scope(scope: str, once: bool) -> bool:
    """Whether C{once} runs in C{scope}: C{"all"}, C{"once"} (main process) or C{"each"} (web)."""
    return scope == "all" or (scope == "once") == once


def get_service(name: str) -> service.IService:
    """@return: the service registered as C{name}. @raise LookupError: there is none."""
    try:
        return _services[name].wrapped
    except KeyError:
        known = ", ".join(sorted(_services)) or "none"
        raise LookupError(f"no service named {name!r} (registered: {known})") from None


class _Named(service.Service):
    def __init__(self, name: str, wrapped: service.IService, once: bool):
        self.name, self.wrapped, self.once = name, wrapped, once

    def startService(self):
        super().startService()
        return self.wrapped.startService()

    def stopService(self):
        super().stopService()
        return self.wrapped.stopService()


def hook_name(hook: Callable[[], Any]) -> str:
    module = getattr(hook, "__module__", None) or "?"
    return f"{module}.{getattr(hook, '__qualname__', repr(hook))}"


def hooks_in_scope(hooks: list, scope: str) -> list:
    return [hook for hook in hooks if in_scope(scope, id(hook) in _once)]


class StartupHooks(service.Service):
    name = "startup-hooks"

    def __init__(self, scope: str = "all"):
        self.scope = scope

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        for hook in hooks_in_scope(_startup_hooks, self.scope):
            if not self.running:
                return
            try:
                await defer.maybeDeferred(hook)
            except Exception as e:
                raise StartupFailed(
                    f"start-up hook {hook_name(hook)} failed: {type(e).__name__}: {e}"
                ) from e


class ShutdownHooks(OrderedService):
    """Runs the shut-down hooks newest first, each stopped like a service within the deadline."""

    name = "shutdown-hooks"

    def __init__(self, reactor, scope: str = "all"):
        super().__init__(reactor)
        self.scope = scope

    def stop_by(self, deadline: float) -> defer.Deferred:
        self._started = [_Hook(hook) for hook in hooks_in_scope(_shutdown_hooks, self.scope)]
        return super().stop_by(deadline)


class _Hook(service.Service):
    def __init__(self, hook: Callable[[], Any]):
        self.hook = hook
        self.name = self.stop_description = f"shut-down hook {hook_name(hook)}"

    def stopService(self) -> defer.Deferred:
        return defer.maybeDeferred(self.hook)


def _reset() -> None:
    global _serving
    _startup_hooks.clear()
    _shutdown_hooks.clear()
    _services.clear()
    _once.clear()
    _serving = None
