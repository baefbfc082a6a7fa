"""
The job client in a reactor (L{JobClient}): one persistent AMP connection
to each job node it is given (C{--jobs-connect}, repeatable), kept by the
reactor. Each call goes to the first node whose connection is up, and to
the next when that connection is lost; a node that comes back is used
again as soon as its connection is up. A node is never waited for once it
is known to be down: its calls fail (or go to the next node) at once, while
its connection is retried in the background with back-off. A connection
that goes silent (a frozen node, a network cut) is pinged and dropped when
the ping is not answered, so that it counts as lost within seconds, not
when TCP gives up. L{twistedlrp.jobs.client} holds the process's client
and the thread-safe facade the public API uses.

Why not C{ClientService}: it logs every retry at info level, and a call
made while it waits to retry waits for the next attempt instead of failing
at once; the connections here are endpoints, C{callLater} and AMP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistedlrp.jobs import wire
from twistedlrp.jobs.client import (
    DEFAULT_TIMEOUT,
    TRIES_PER_NODE,
    Attempts,
    no_answer,
    reconnect_backoff,
    unix_path,
    unknown_outcome,
    unreachable,
)
from twistedlrp.jobs.errors import AuthenticationFailed, JobServiceUnavailable

log = Logger()

# A connection that has received nothing for PING_IDLE seconds is pinged
# (an empty Announce, answered by the node's reactor without its store);
# without an answer within PING_TIMEOUT it is dropped, and counts as lost.
PING_IDLE = 2.0
PING_TIMEOUT = 3.0
# After its connection broke during a call, that call may wait this long
# for the node's immediate reconnection (a restart, a dropped idle
# connection) to resend the request there, when no other node is up.
RECONNECT_WAIT = 2.0

UP, DOWN, CONNECTING = "up", "down", "connecting"


class JobLink:
    """
    A persistent connection to one job node.

    It connects at L{start}. Until that first attempt ends its state is
    C{"connecting"} and calls wait for it; then it is C{"up"} or C{"down"}.
    A lost connection, or an attempt that fails, makes it C{"down"} at once
    (one warning), and it is retried in the background with back-off (the
    first retry at once), then one line when it is up again.

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
        self.reactor = reactor
        self.endpoint = description or str(endpoint)
        # A UNIX socket that does not exist means no service: say so at once.
        self._socket_path = unix_path(endpoint) if isinstance(endpoint, str) else None
        if isinstance(endpoint, str):
            endpoint = clientFromString(reactor, endpoint)
        self._connector = endpoint
        self.secret = secret
        self.timeout = timeout
        self.on_change = on_change
        self.state = CONNECTING
        self.since = reactor.seconds()
        self.last_error: str | None = None
        # The service refused our secret: calls say so, not "unavailable".
        self.refused = False
        self.protocol: _ClientAMP | None = None
        self._attempting: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._retry = None
        self._backoff = reconnect_backoff()
        self._warned = False
        self._stopped = True
        self._closed: defer.Deferred | None = None
        self._pinging = False
        self._watch = task.LoopingCall(self._check)
        self._watch.clock = reactor

    # -- life ----------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._attempt()
        self._watch.start(min(PING_IDLE, 1.0), now=False)

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once the connection is closed."""
        self._stopped = True
        if self._watch.running:
            self._watch.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
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

    # -- connecting ----------------------------------------------------------------

    def _attempt(self) -> None:
        if self._attempting is not None or self._stopped:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._socket_path is not None and not os.path.exists(self._socket_path):
            self._failed(
                Failure(
                    JobServiceUnavailable(
                        "its socket does not exist (is the server running, with this "
                        "--state-dir or LRP_STATE_DIR?)"
                    )
                )
            )
            return
        d = defer.ensureDeferred(self._connect())
        d.addTimeout(self.timeout, self.reactor)
        self._attempting = d
        d.addCallbacks(self._connected, self._failed)

    async def _connect(self):
        protocol = await self._connector.connect(_ClientFactory(self.reactor, self._lost))
        if self.secret is not None:
            try:
                await wire.login(protocol, self.secret)
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.loseConnection()
                raise
        return protocol

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
        self.last_error = None
        self.refused = False
        self._backoff.reset()
        self._set_state(UP)
        self._fire_waiting(protocol)

    def _failed(self, failure: Failure) -> None:
        self._attempting = None
        if failure.check(defer.CancelledError) and self._stopped:
            failure = Failure(JobServiceUnavailable("the job client is stopped"))
        if failure.check(defer.TimeoutError):
            self.last_error = f"no connection within {self.timeout:g} s"
        else:
            self.last_error = _reason(failure)
        self.refused = bool(failure.check(AuthenticationFailed))
        if self.refused:
            self.last_error = f"it refused the shared secret ({failure.getErrorMessage()})"
            failure = Failure(AuthenticationFailed(self.problem()))
        else:
            failure = Failure(JobServiceUnavailable(self.problem()))
        if not self._stopped:
            if not self._warned:
                self._warned = True
                log.warn(
                    "Cannot reach the job service at {endpoint} ({reason}); job calls "
                    "to it fail at once while it is retried in the background, up to "
                    "every {most:g} s",
                    endpoint=self.endpoint,
                    reason=self.last_error,
                    most=self._backoff.maximum,
                )
            self._retry = self.reactor.callLater(self._backoff.next(), self._attempt)
            self._set_state(DOWN)
        self._fire_waiting(failure)

    def _fire_waiting(self, outcome) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(outcome)

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
        self.last_error = "the connection was lost"
        self._set_state(DOWN)
        # Again at once (a restart, a dropped connection); back-off if refused.
        self._attempt()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = self.reactor.seconds()
        if self.on_change is not None:
            self.on_change(self)

    # -- the ping ------------------------------------------------------------------

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

    # -- calls ---------------------------------------------------------------------

    def problem(self) -> str:
        """@return: why calls to this node fail now."""
        text = unreachable(self.endpoint, f": {self.last_error}" if self.last_error else "")
        if self.state == DOWN:
            text += (
                f" (down for {self.reactor.seconds() - self.since:.1f} s; "
                f"retried in the background)"
            )
        return text

    async def connected(self, deadline: float, wait_reconnect: bool = False) -> wire.QuietAMP:
        """
        @return: the connected protocol: at once when up; when connecting
            for the first time, once connected (until C{deadline}); when
            down, only with C{wait_reconnect} and an attempt under way
            (until C{deadline}).
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
            raise JobServiceUnavailable(unreachable(self.endpoint, " in time")) from None


class JobClient:
    """
    The process's job client in the reactor: a L{JobLink} to each job node
    given, in order of preference.

    Each call goes to the first node whose connection is up (or, before any
    first attempt ended, waits for it). When its connection breaks during
    the call, the request is sent again to the next node that is up, or to
    the same node once it reconnected (within L{RECONNECT_WAIT}), within the
    call's deadline: every operation may be repeated (a submission carries
    the id the client chose, L{twistedlrp.jobs.client.call}); a submission
    without an id is not repeated. A node that answers C{UNAVAILABLE}
    (stopping, its store away) is replaced by the next for that call. When
    no node is up the call fails at once with L{JobServiceUnavailable}.

    @param endpoints: a client endpoint string, a list of them, or an
        C{IStreamClientEndpoint} (then C{description} names it).
    @param secret: the shared secret, for every node but those on a UNIX
        socket, or C{None}.
    """

    def __init__(
        self,
        reactor,
        endpoints,
        secret: bytes | None,
        timeout: float = DEFAULT_TIMEOUT,
        description: str | None = None,
    ):
        self.reactor = reactor
        self.timeout = timeout
        if isinstance(endpoints, str) or not isinstance(endpoints, list | tuple):
            endpoints = [endpoints]
        self.links = [
            JobLink(
                reactor,
                endpoint,
                None if isinstance(endpoint, str) and endpoint.startswith("unix:") else secret,
                timeout,
                description if len(endpoints) == 1 else None,
                self._changed,
            )
            for endpoint in endpoints
        ]
        self._current: JobLink | None = None
        self._since = reactor.seconds()
        self._started = False

    def start(self) -> None:
        self._started = True
        self._since = self.reactor.seconds()
        for link in self.links:
            link.start()

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once every connection is closed."""
        self._started = False
        return defer.gatherResults([link.stop() for link in self.links], consumeErrors=True)

    @property
    def endpoint(self) -> str:
        """@return: the node calls go to now, else the first (for messages)."""
        return (self._current or self.links[0]).endpoint

    @property
    def last_error(self) -> str | None:
        return None if self._current is not None else self.links[0].last_error

    def current(self) -> JobLink | None:
        """@return: the node calls go to now: the first that is up."""
        for link in self.links:
            if link.state == UP:
                return link
        return None

    def _changed(self, link: JobLink) -> None:
        current = self.current()
        if current is self._current:
            return
        previous, self._current = self._current, current
        self._since = self.reactor.seconds()
        if not self._started or len(self.links) == 1:
            return  # The link's own lines say it all.
        if current is None:
            log.warn("No job node can be reached: job calls fail at once until one is back")
        elif previous is not None or link is not current:
            log.info("Job calls go to the job service at {endpoint}", endpoint=current.endpoint)

    def describe(self, requires: bool = False) -> dict:
        """
        @param requires: whether the node needs a job node to be healthy.
        @return: the C{job_link} section of the health endpoint.
        """
        now = self.reactor.seconds()
        wall = time.time()
        current = self.current()
        if current is not None:
            state = UP
        elif any(link.state == CONNECTING for link in self.links):
            state = CONNECTING
        else:
            state = DOWN
        body = {
            "state": state,
            "node": current.endpoint if current is not None else None,
            "since": _iso(wall - (now - self._since)),
            "for": round(now - self._since, 3),
            "nodes": [
                {
                    "endpoint": link.endpoint,
                    "state": link.state,
                    "since": _iso(wall - (now - link.since)),
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
        if lost is not None and lost.reconnecting and tries.get(lost, 0) < TRIES_PER_NODE:
            return lost, True
        return None, False

    async def request(self, op: str, kw: dict, timeout: float | None = None):
        """
        Send one operation (to the first node that is up; see the class).

        @return: the operation's answer (a job description, a list, stats).
        @raise JobError: the service's own error (a subclass says which).
        @raise JobServiceUnavailable: no node could be reached, or the
            connection broke (then the message says whether the outcome
            is unknown).
        """
        attempts = Attempts(op, kw, timeout or self.timeout, self.reactor.seconds())
        deadline = attempts.deadline
        lost: JobLink | None = None
        while True:
            link, wait_reconnect = self._choose(attempts.tries, lost)
            if link is None:
                raise attempts.failed(self.links)
            attempts.tries[link] = attempts.tries.get(link, 0) + 1
            wait_until = deadline
            if wait_reconnect:
                wait_until = min(deadline, self.reactor.seconds() + RECONNECT_WAIT)
            lost = None
            try:
                proto = await link.connected(wait_until, wait_reconnect)
            except AuthenticationFailed:
                raise
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
                attempts.broke(
                    f"the connection to the job service at {link.endpoint} broke during {op}: {e}"
                )
                lost = link
            except amp.UnknownRemoteError as e:
                raise JobServiceUnavailable(
                    f"the job service at {link.endpoint} failed during {op}: {e}"
                    + unknown_outcome(op)
                ) from None
            except JobServiceUnavailable as e:
                attempts.refused(link, e, len(self.links))


class _ClientAMP(wire.QuietAMP):
    def __init__(self, clock, on_lost):
        super().__init__()
        self._clock = clock
        self._on_lost = on_lost
        self.last_received = clock.seconds()

    def ampBoxReceived(self, box):
        self.last_received = self._clock.seconds()
        super().ampBoxReceived(box)

    def connectionLost(self, reason):
        # First the link (it is down before the calls on it fail and look for another).
        self._on_lost(self)
        super().connectionLost(reason)


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, clock, on_lost):
        self._clock = clock
        self._on_lost = on_lost

    def buildProtocol(self, addr):
        return _ClientAMP(self._clock, self._on_lost)


def _reason(failure: Failure) -> str:
    return failure.getErrorMessage() or failure.type.__name__


def _iso(unix_time: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_time))
