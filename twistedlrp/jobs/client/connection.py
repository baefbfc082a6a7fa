"""
The job clients in a reactor: L{JobClient} calls the first job node up, each through
one persistent AMP connection (L{JobLink}); L{LocalClient}, the service of this process.
Not C{ClientService}: its C{whenConnected()} waits for the next attempt where a call to
a node that is down must fail at once, and it shows neither its state nor the last error.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.protocols import amp, policies
from twisted.python.failure import Failure

from twistedlrp.jobs.client.calls import (
    CONNECTING,
    DEFAULT_TIMEOUT,
    DOWN,
    NO_SOCKET,
    TRIES_PER_NODE,
    UP,
    Attempts,
    Node,
    broke_during,
    no_answer,
    socket_address,
    unreachable,
)
from twistedlrp.jobs.errors import AuthenticationFailed, JobServiceUnavailable, unsure
from twistedlrp.jobs.protocol import limits, wire
from twistedlrp.ordered_service import cancel_call

log = Logger()

# A call whose connection broke may wait this long for the node's immediate
# reconnection (a restart) to resend the request there, when no other node is up.
RECONNECT_WAIT = 2.0
# A connection silent for PING_IDLE seconds is pinged (an empty Announce, answered
# without the store); without an answer within PING_TIMEOUT it counts as lost.
PING_IDLE = 2.0
PING_TIMEOUT = 3.0


class JobLink(Node):
    """
    A persistent connection to one job node: C{"connecting"} until the first attempt
    ends (calls wait for it), then C{"up"} or C{"down"} (calls fail at once while it is
    retried). Pinged when silent. C{on_change(link)} after each change of state.
    """

    def __init__(self, reactor, endpoint: str, secret: bytes | None, timeout: float, on_change):
        super().__init__(endpoint, secret, reactor.seconds)
        self.reactor = reactor
        # A UNIX socket that does not exist means no service: say so at once.
        family, self._socket_path = socket_address(endpoint) or (None, None)
        if family != socket.AF_UNIX:
            self._socket_path = None
        self._connector = clientFromString(reactor, endpoint)
        self.timeout = timeout
        self.on_change = on_change
        self.protocol: _ClientAMP | None = None
        self._attempting: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._retry = self._closed = None  # an IDelayedCall; a Deferred while closing
        self._stopped = True

    def start(self) -> None:
        self._stopped = False
        self._attempt()

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once the connection is closed."""
        self._stopped = True
        cancel_call(self._retry)
        if self._attempting is not None:
            self._attempting.cancel()
        if self.protocol is None or self.protocol.transport is None:
            return defer.succeed(None)
        self._closed = defer.Deferred()
        self.protocol.transport.loseConnection()
        return self._closed

    def _attempt(self) -> None:
        if self._attempting is not None or self._stopped:
            return
        cancel_call(self._retry)
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
        if self.state == DOWN:
            log.info(
                "Connected to the job service at {endpoint} again (after {seconds:.1f} s)",
                endpoint=self.endpoint,
                seconds=now - self.since,
            )
        self.protocol = protocol
        protocol.setTimeout(PING_IDLE)
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
            if self.state != DOWN:
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
        if protocol is not self.protocol:
            return
        self.protocol = None
        if self._closed is not None:
            closed, self._closed = self._closed, None
            closed.callback(None)
        if self._stopped:
            return
        log.warn("Lost the connection to the job service at {endpoint}", endpoint=self.endpoint)
        self.down("the connection was lost", lost=True)
        # Again at once (a restart, a dropped connection); back-off if refused.
        self._attempt()

    def set_state(self, state: str) -> None:
        super().set_state(state)
        self.on_change(self)

    def ping(self, protocol) -> None:
        """C{protocol} was silent for L{PING_IDLE} s: ask it, drop it if it does not answer."""
        if protocol is not self.protocol or self._stopped:
            return
        d = protocol.callRemote(wire.Announce, job_ids=[])
        d.addTimeout(PING_TIMEOUT, self.reactor)

        def answered(outcome):
            if protocol is not self.protocol:
                return
            # Any answer but a timeout, an error included, came from a live service.
            if not (isinstance(outcome, Failure) and outcome.check(defer.TimeoutError)):
                protocol.setTimeout(PING_IDLE)
                return
            log.warn(
                "The job service at {endpoint} did not answer a ping within {seconds:g} s: "
                "dropping its connection",
                endpoint=self.endpoint,
                seconds=PING_TIMEOUT,
            )
            protocol.transport.abortConnection()

        d.addBoth(answered)

    def problem(self) -> str:
        if self.state != DOWN:
            return super().problem()
        down = self.reactor.seconds() - self.since
        return f"{super().problem()} (down for {down:.1f} s; retried in the background)"

    async def connected(self, deadline: float, wait_reconnect: bool = False) -> wire.QuietAMP:
        """
        @return: the connected protocol, once connected before C{deadline} if connecting
            (with C{wait_reconnect}, again). @raise JobServiceUnavailable: down, not in
            time, or L{AuthenticationFailed}: the service refused our secret.
        """
        if self.protocol is not None:
            return self.protocol
        if self._stopped:
            raise JobServiceUnavailable(f"the job client of {self.endpoint} is stopped")
        if self.state == DOWN and not (wait_reconnect and self._attempting is not None):
            raise (AuthenticationFailed if self.refused else JobServiceUnavailable)(self.problem())
        d = defer.Deferred()
        self._waiting.append(d)
        d.addTimeout(max(deadline - self.reactor.seconds(), 0.001), self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise JobServiceUnavailable(unreachable(self.endpoint, detail=" in time")) from None


class _ClientAMP(wire.QuietAMP, policies.TimeoutMixin):
    # Built by a factory whose "link" is its JobLink; its timeout (once up) is a ping.

    def callLater(self, period, func):
        return self.factory.link.reactor.callLater(period, func)

    def ampBoxReceived(self, box):
        self.resetTimeout()
        super().ampBoxReceived(box)

    def timeoutConnection(self):
        self.factory.link.ping(self)

    def connectionLost(self, reason):
        self.setTimeout(None)
        # First the link (it is down before the calls on it fail and look for another).
        self.factory.link._lost(self)
        super().connectionLost(reason)


class JobClient:
    """
    A L{JobLink} to each job node given (an endpoint string, or a list in order of
    preference; the secret for those not on a UNIX socket). A call goes to the first
    node up; when its connection breaks, to the next up or the same one reconnected.
    """

    def __init__(self, reactor, endpoints, secret: bytes | None, timeout: float = DEFAULT_TIMEOUT):
        self.reactor = reactor
        self.timeout = timeout
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.links = [
            JobLink(reactor, e, None if e.startswith("unix:") else secret, timeout, self._changed)
            for e in endpoints
        ]
        self._current: JobLink | None = None
        self._since = reactor.seconds()

    def start(self) -> None:
        self._since = self.reactor.seconds()
        for link in self.links:
            link.start()

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once every connection is closed."""
        return defer.gatherResults([link.stop() for link in self.links], consumeErrors=True)

    def current(self) -> JobLink | None:
        return next((link for link in self.links if link.state == UP), None)

    def _changed(self, link: JobLink) -> None:
        current = self.current()
        if current is self._current:
            return
        previous, self._current = self._current, current
        self._since = self.reactor.seconds()
        if len(self.links) == 1:
            return  # The link's own lines say it all.
        if current is None:
            log.warn("No job node can be reached: job calls fail at once until one is back")
        elif previous is not None or link is not current:
            log.info("Job calls go to the job service at {endpoint}", endpoint=current.endpoint)

    def describe(self, requires: bool = False) -> dict:
        """@return: the C{job_link} section of the health endpoint (C{healthy} if C{requires})."""
        now = self.reactor.seconds()
        wall = time.time()

        def iso(monotonic: float) -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall - (now - monotonic)))

        current = self.current()
        connecting = any(link.state == CONNECTING for link in self.links)
        state = UP if current is not None else CONNECTING if connecting else DOWN
        body = {
            "state": state,
            "node": current.endpoint if current is not None else None,
            "since": iso(self._since),
            "for": round(now - self._since, 3),
            "nodes": [
                {
                    "endpoint": link.endpoint,
                    "state": link.state,
                    "since": iso(link.since),
                    **({"error": link.last_error} if link.state != UP else {}),
                }
                for link in self.links
            ],
        }
        if requires:
            body["healthy"] = state == UP
        return body

    def _choose(self, tries: dict, lost: JobLink | None) -> tuple[JobLink | None, bool]:
        """@return: the node to try next and whether to wait for its reconnection."""
        for link in self.links:
            if link.state == UP and tries.get(link, 0) < TRIES_PER_NODE:
                return link, False
        for link in self.links:
            if link.state == CONNECTING and not tries.get(link):
                return link, False
        if lost and lost._attempting and tries.get(lost, 0) < TRIES_PER_NODE:
            return lost, True
        return None, False

    async def request(self, op: str, kw: dict, timeout: float | None = None):
        """
        @return: the operation's answer. @raise JobError: the service's own error, or
            L{JobServiceUnavailable}: no node answered (the message says if it may have acted).
        """
        attempts = Attempts(op, kw, timeout or self.timeout, self.reactor.seconds())
        deadline = attempts.deadline
        lost: JobLink | None = None
        while True:
            link, wait_reconnect = self._choose(attempts.tries, lost)
            if link is None:
                raise attempts.failed(self.links)
            attempts.tries[link] = attempts.tries.get(link, 0) + 1
            until = min(deadline, self.reactor.seconds() + RECONNECT_WAIT)
            lost = None
            try:
                proto = await link.connected(until if wait_reconnect else deadline, wait_reconnect)
            except JobServiceUnavailable as e:
                attempts.problems.append(str(e))
                continue
            operation = wire.OPERATIONS[op]
            d = proto.callRemote(operation.command, **attempts.arguments(self.reactor.seconds()))
            d.addTimeout(max(deadline - self.reactor.seconds(), 0.001), self.reactor)
            try:
                return (await d)[operation.answer]
            except defer.TimeoutError:
                raise no_answer(link.endpoint, op, attempts.limit, kw.get("id")) from None
            except (error.ConnectionLost, error.ConnectionDone) as e:
                attempts.broke(broke_during(link.endpoint, op, e))
                lost = link
            except amp.UnknownRemoteError as e:
                raise unsure(
                    f"the job service at {link.endpoint} failed during {op}: {e}", op
                ) from None
            except JobServiceUnavailable as e:
                attempts.refused(link, e, len(self.links))


class LocalClient:
    """
    The job service of this very process, called without AMP or a socket (C{description}
    names it in messages); answers and errors are those of L{JobClient.request}.
    """

    def __init__(self, reactor, service, timeout: float, description: str):
        self.reactor = reactor
        self.service = service
        self.timeout = timeout
        self.endpoint = description

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    async def request(self, op: str, kw: dict, timeout: float | None = None):
        """@return: the answer. @raise JobError: the service's, or it did not answer in time."""
        limit = timeout or self.timeout
        listening = self.service.when_listening()
        if not listening.called:
            # Starting: wait for it, as a connection to it would.
            listening.addTimeout(limit, self.reactor)
            try:
                await listening
            except defer.TimeoutError:
                raise JobServiceUnavailable(
                    unreachable(self.endpoint, detail=f" within {limit:g} s (it is starting)")
                ) from None
        operation = wire.OPERATIONS[op]
        d = limits.guarded(
            log, op, operation.call, self.service.operations, operation.arguments(kw)
        )
        d.addTimeout(limit, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise no_answer(self.endpoint, op, limit, kw.get("id")) from None
