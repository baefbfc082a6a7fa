"""
The site's own start-up and shut-down: hooks and long-lived services.

Register from an ``lrp`` module of an installed app (imported at start-up)
or from ``AppConfig.ready()``::

    from twistedlrp.lifecycle import on_startup, on_shutdown, add_service

    @on_startup
    async def warm_cache():
        ...

Start-up hooks run in registration order in the reactor thread, after the
thread pool, the job service and the registered services have started and
before any port opens. A hook may be a plain function, return a Deferred, or
be ``async def``; its result is awaited. Blocking work in a hook delays
start-up only; push it to a thread (``deferToThread``) in shut-down hooks,
which run in reverse order, each bounded by what is left of the graceful
deadline.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.internet import defer

_startup_hooks: list[Callable[[], Any]] = []
_shutdown_hooks: list[Callable[[], Any]] = []
_services: dict[str, IService] = {}
# The running server, set while it runs, so that services added late start at once.
_server: Any = None


def on_startup(hook: Callable[[], Any]) -> Callable[[], Any]:
    """
    Register C{hook} to run at server start, before the ports open.

    @return: C{hook} itself, so this works as a decorator.
    """
    if not callable(hook):
        raise TypeError(f"on_startup expects a callable, got {hook!r}")
    if hook not in _startup_hooks:
        _startup_hooks.append(hook)
    return hook


def on_shutdown(hook: Callable[[], Any]) -> Callable[[], Any]:
    """
    Register C{hook} to run at server stop, after requests and jobs drained.

    @return: C{hook} itself, so this works as a decorator.
    """
    if not callable(hook):
        raise TypeError(f"on_shutdown expects a callable, got {hook!r}")
    if hook not in _shutdown_hooks:
        _shutdown_hooks.append(hook)
    return hook


def add_service(name: str, service: IService) -> IService:
    """
    Start C{service} (any Twisted L{IService}) with the server and stop it
    with the server, in registration order (and the reverse at stop). A
    Deferred returned by its C{startService} or C{stopService} is awaited.

    @return: C{service}.
    @raise ValueError: a service of that name is registered already.
    @raise TypeError: C{service} does not provide L{IService}.
    """
    if not IService.providedBy(service):
        raise TypeError(f"add_service({name!r}): {service!r} does not provide IService")
    if name in _services:
        raise ValueError(f"a service named {name!r} is registered already")
    _services[name] = service
    if _server is not None:
        _server.service_added(name, service)
    return service


def get_service(name: str) -> IService:
    """
    @return: the service registered as C{name}.
    @raise LookupError: nothing is registered under C{name}.
    """
    try:
        return _services[name]
    except KeyError:
        known = ", ".join(sorted(_services)) or "none"
        raise LookupError(f"no service named {name!r} (registered: {known})") from None


def run_hook(hook: Callable[[], Any]) -> defer.Deferred:
    """
    Call C{hook} in the reactor thread.

    @return: a Deferred that fires with its result once any Deferred or
        coroutine it returned has finished, or fails with its exception.
    """
    if inspect.iscoroutinefunction(hook):
        return defer.Deferred.fromCoroutine(hook())
    result = defer.maybeDeferred(hook)

    def _await_coroutine(value):
        if inspect.iscoroutine(value):
            return defer.Deferred.fromCoroutine(value)
        return value

    return result.addCallback(_await_coroutine)


def hook_name(hook: Callable[[], Any]) -> str:
    module = getattr(hook, "__module__", None) or "?"
    return f"{module}.{getattr(hook, '__qualname__', repr(hook))}"


def _reset() -> None:
    """Forget every hook and service (for tests that register their own)."""
    _startup_hooks.clear()
    _shutdown_hooks.clear()
    _services.clear()
