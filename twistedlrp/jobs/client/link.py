"""One persistent AMP connection to one job node (L{JobLink}), for L{JobClient}."""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs.client.calls import (
    DEFAULT_TIMEOUT,
    DOWN,
    NO_SOCKET,
    Node,
    unix_path,
    unreachable,
)
from twistedlrp.jobs.errors import AuthenticationFailed, JobServiceUnavailable
from twistedlrp.jobs.protocol import wire

log = Logger()

# A connection that has received nothing for PING_IDLE seconds is pinged
# (an empty Announce, answered by the node's reactor without its store);
# without an answer within PING_TIMEOUT it is dropped, and counts as lost.
PING_IDLE = 2.0
PING_TIMEOUT = 3.0


class JobLink(Node):
    """
    A persistent connection to one job node. Until the first attempt (at
    L{start}) ends its state is C{"connecting"} and calls wait for it; then
    it is C{"up"} or C{"down"}. Down, calls fail at once while it is retried
    in the background with back-off; pinged when silent, a frozen node or a
    network cut counts as lost within seconds, not when TCP gives up.

    @param endpoint: a client endpoint string, or an C{IStreamClientEndpoint}
        (then C{description} names it in messages).
    @param secret: the shared secret, or C{None} (no Login; fine on a UNIX socket).
    @param on_change: called with the link after each change of state.
    """

    def __init__(
        self,
        reactor,
        endpoint,
        secret: bytes | None,
        timeout: float = DEFAULT_TIMEOUT,
        description: str | None = None,
        on_change: Callable[[JobLink], None] | None = None,
    ):
        super().__init__(description or str(endpoint), secret, reactor.seconds)
        self.reactor = reactor
        # A UNIX socket that does not exist means no service: say so at once.
        self._socket_path = unix_path(endpoint) if isinstance(endpoint, str) else None
        if isinstance(endpoint, str):
            endpoint = clientFromString(reactor, endpoint)
        self._connector = endpoint
        self.timeout = timeout
        self.on_change = on_change
        self.protocol: _ClientAMP | None = None
        self._attempting: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._retry = None
        self._warned = False
        self._stopped = True
        self._closed: defer.Deferred | None = None
        self._pinging = False
        self._watch = task.LoopingCall(self._check)
        self._watch.clock = reactor

    def start(self) -> None:
        self._stopped = False
        self._attempt()
        self._watch.start(min(PING_IDLE, 1.0), now=False)

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once the connection is closed."""
        self._stopped = True
        if self._watch.running:
            self._watch.stop()
        self._cancel_retry()
        if self._attempting is not None:
            self._attempting.cancel()
        protocol = self.protocol
        if protocol is None or protocol.transport is None:
            return defer.succeed(None)
        self._closed = defer.Deferred()
        protocol.transport.loseConnection()
        return self._closed

    @property
    def reconnecting(self) -> bool:
        """@return: whether an attempt to connect is under way."""
        return self._attempting is not None

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _attempt(self) -> None:
        if self._attempting is not None or self._stopped:
            return
        self._cancel_retry()
        if self._socket_path is not None and not os.path.exists(self._socket_path):
            self._failed(Failure(JobServiceUnavailable(NO_SOCKET)))
            return
        d = defer.ensureDeferred(self._connect())
        d.addTimeout(self.timeout, self.reactor)
        self._attempting = d
        d.addCallbacks(self._connected, self._failed)

    async def _connect(self):
        factory = protocol.Factory.forProtocol(_ClientAMP)
        factory.noisy, factory.link = False, self
        proto = await self._connector.connect(factory)
        if self.secret is not None:
            try:
                await wire.login(proto, self.secret)
            except BaseException:
                if proto.transport is not None:
                    proto.transport.loseConnection()
                raise
        return proto

    def _connected(self, protocol) -> None:
        self._attempting = None
        if self._stopped:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            self._fire_waiting(Failure(JobServiceUnavailable("the job client is stopped")))
            return
        now = self.reactor.seconds()
        if self._warned:
            log.info(
                "Connected to the job service at {endpoint} again (after {seconds:.1f} s)",
                endpoint=self.endpoint,
                seconds=now - self.since,
            )
        self._warned = False
        self.protocol = protocol
        protocol.last_received = now
        self.up()
        self._fire_waiting(protocol)

    def _failed(self, failure: Failure) -> None:
        self._attempting = None
        if failure.check(defer.CancelledError) and self._stopped:
            failure = Failure(JobServiceUnavailable("the job client is stopped"))
        refused = bool(failure.check(AuthenticationFailed))
        if refused:
            reason = f"it refused the shared secret ({failure.getErrorMessage()})"
        elif failure.check(defer.TimeoutError):
            reason = f"no connection within {self.timeout:g} s"
        else:
            reason = failure.getErrorMessage() or failure.type.__name__
        self.last_error, self.refused = reason, refused
        error = (AuthenticationFailed if refused else JobServiceUnavailable)(self.problem())
        if not self._stopped:
            if not self._warned:
                self._warned = True
                log.warn(
                    "Cannot reach the job service at {endpoint} ({reason}); job calls "
                    "to it fail at once while it is retried in the background, up to "
                    "every {most:g} s",
                    endpoint=self.endpoint,
                    reason=reason,
                    most=self.backoff.maximum,
                )
            self._retry = self.reactor.callLater(self.down(reason, refused), self._attempt)
        self._fire_waiting(Failure(error))

    def _fire_waiting(self, outcome) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                (d.errback if isinstance(outcome, Failure) else d.callback)(outcome)

    def _lost(self, protocol) -> None:
        """The connection of C{protocol} is lost (before its pending calls fail)."""
        if protocol is not self.protocol:
            return
        self.protocol = None
        if self._closed is not None:
            closed, self._closed = self._closed, None
            closed.callback(None)
        if self._stopped:
            return
        log.warn("Lost the connection to the job service at {endpoint}", endpoint=self.endpoint)
        self._warned = True
        self.down("the connection was lost", lost=True)
        # Again at once (a restart, a dropped connection); back-off if refused.
        self._attempt()

    def set_state(self, state: str) -> None:
        super().set_state(state)
        if self.on_change is not None:
            self.on_change(self)

    def _check(self) -> None:
        protocol = self.protocol
        if protocol is None or self._pinging:
            return
        if self.reactor.seconds() - protocol.last_received < PING_IDLE:
            return
        self._pinging = True
        d = protocol.callRemote(wire.Announce, job_ids=[])
        d.addTimeout(PING_TIMEOUT, self.reactor)

        def answered(outcome):
            self._pinging = False
            if isinstance(outcome, Failure) and outcome.check(defer.TimeoutError):
                if protocol is self.protocol and protocol.transport is not None:
                    log.warn(
                        "The job service at {endpoint} did not answer a ping within "
                        "{seconds:g} s: dropping its connection",
                        endpoint=self.endpoint,
                        seconds=PING_TIMEOUT,
                    )
                    protocol.transport.abortConnection()
            # Any other answer, an error included, came from a live service.

        d.addBoth(answered)

    def problem(self) -> str:
        text = super().problem()
        if self.state == DOWN:
            text += (
                f" (down for {self.reactor.seconds() - self.since:.1f} s; "
                f"retried in the background)"
            )
        return text

    async def connected(self, deadline: float, wait_reconnect: bool = False) -> wire.QuietAMP:
        """
        @return: the connected protocol: at once when up; else, when
            connecting for the first time or (with C{wait_reconnect}) again,
            once connected before C{deadline}.
        @raise JobServiceUnavailable: down, or not connected in time.
        @raise AuthenticationFailed: the service refused our secret.
        """
        if self.protocol is not None:
            return self.protocol
        if self._stopped:
            raise JobServiceUnavailable(f"the job client of {self.endpoint} is stopped")
        if self.state == DOWN and not (wait_reconnect and self._attempting is not None):
            raise (AuthenticationFailed if self.refused else JobServiceUnavailable)(self.problem())
        if self._attempting is None:
            self._attempt()
            if self.protocol is not None:
                return self.protocol
            if self._attempting is None:
                raise JobServiceUnavailable(self.problem())
        d = defer.Deferred()
        self._waiting.append(d)
        d.addTimeout(max(deadline - self.reactor.seconds(), 0.001), self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise JobServiceUnavailable(unreachable(self.endpoint, detail=" in time")) from None


class _ClientAMP(wire.QuietAMP):
    """Built by a factory whose C{link} is its L{JobLink}."""

    last_received = 0.0  # the link's clock

    def ampBoxReceived(self, box):
        self.last_received = self.factory.link.reactor.seconds()
        super().ampBoxReceived(box)

    def connectionLost(self, reason):
        # First the link (it is down before the calls on it fail and look for another).
        self.factory.link._lost(self)
        super().connectionLost(reason)
