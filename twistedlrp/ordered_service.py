"""
L{OrderedService}: a C{MultiService} whose children start in order, each awaited
(Twisted's ignores a Deferred from C{startService}), and stop in reverse within
one deadline, passed to a child's C{stop_by(deadline)} if it has one.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

# Shut-down steps still get this long when the deadline has passed.
LATE_STEP_SECONDS = 0.2


class Waiters:
    """Deferreds waiting for one moment: L{wait} hands out one, L{fire} fires those out."""

    def __init__(self):
        self._waiting: list[defer.Deferred] = []

    def wait(self) -> defer.Deferred:
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def fire(self, result=None) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.callback(result)


def cancel_call(call) -> None:
    """Cancel the delayed call C{call} unless it is C{None}, called or cancelled."""
    if call is not None and call.active():
        call.cancel()


class StartupFailed(Exception):
    """A start-up step failed; the message says which and why."""


async def within(reactor, d: defer.Deferred, seconds: float, what: str | None = None) -> bool:
    """@return: whether C{d} finished (or failed, logged) within C{seconds}, else cancelled."""
    d.addTimeout(max(seconds, 0.01), reactor)
    try:
        await d
    except defer.TimeoutError:
        if what:
            log.warn("{what} did not finish before the graceful deadline", what=what)
        return False
    except Exception:
        log.failure("Error while {what}", what=what or "stopping")
    return True


def stop_child(reactor, child: service.IService, deadline: float) -> defer.Deferred:
    """@return: a Deferred (never failing) of whether C{child} stopped by C{deadline}."""
    if hasattr(child, "stop_by"):
        d = defer.maybeDeferred(child.stop_by, deadline)
    else:
        d = defer.maybeDeferred(child.stopService)
    # The step's own cut-offs aim at the deadline itself: this one comes
    # after them, or it would cancel a step at the moment it is cutting its
    # own work (a drain aborting the connections left), as a tie can.
    remaining = max(deadline - reactor.seconds(), 0) + LATE_STEP_SECONDS
    what = getattr(child, "stop_description", None)
    what = what or f"stopping {child.name or type(child).__name__}"
    return defer.ensureDeferred(within(reactor, d, remaining, what))


class OrderedService(service.MultiService):
    """A child added while running starts at once; a stop takes C{graceful_timeout} at most."""

    def __init__(self, reactor=None, graceful_timeout: float = 30.0):
        super().__init__()
        self._reactor = reactor
        self.graceful_timeout = graceful_timeout
        self._started: list[service.IService] = []
        self._stopping: defer.Deferred | None = None

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> defer.Deferred:
        service.Service.startService(self)
        self._stopping = None
        return defer.ensureDeferred(self.start_children())

    async def start_children(self) -> None:
        """Start each child not started yet, in order; @raise StartupFailed: one failed."""
        for child in list(self):
            if not self.running:
                return  # Stopping began meanwhile.
            if child in self._started:
                continue
            self._started.append(child)
            try:
                await defer.maybeDeferred(child.startService)
            except StartupFailed:
                raise
            except Exception as e:
                name = child.name or type(child).__name__
                raise StartupFailed(
                    f"service {name!r} failed to start: {type(e).__name__}: {e}"
                ) from e

    def addService(self, child: service.IService) -> None:
        if child.name is not None:
            if child.name in self.namedServices:
                raise RuntimeError(f"cannot have two services named {child.name!r}")
            self.namedServices[child.name] = child
        self.services.append(child)
        if self.running and self._stopping is None:
            self._started.append(child)
            d = defer.maybeDeferred(child.startService)
            message = "Service {name} failed to start"
            d.addErrback(lambda f: log.failure(message, f, name=child.name))

    def stopService(self) -> defer.Deferred:
        return self.stop_by(self.reactor.seconds() + self.graceful_timeout)

    def stop_by(self, deadline: float) -> defer.Deferred:
        """Stop the started children newest first by C{deadline}; the Deferred never fails."""
        if self._stopping is None:
            service.Service.stopService(self)
            self._stopping = defer.ensureDeferred(self._stop_children(deadline))
        return self._stopping

    async def _stop_children(self, deadline: float) -> None:
        for child in reversed(self._started):
            await stop_child(self.reactor, child, deadline)
        self._started = []
