"""
The job client in a reactor (L{JobClient}). Why not C{ClientService}
(Twisted 26.10): a call must fail at once while its node is down, but
C{whenConnected()} while it waits to retry (even with C{failAfterFailures})
waits for the next attempt; it shows neither its state nor the last
connection error, which the calls' errors and the health endpoint's
C{job_link} section say (we would keep our own state beside its own); and
it logs every retry at info level ("Scheduling retry ...", which
tests/test_faults.py checks the log is without).
"""

from __future__ import annotations

import time

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.protocols import amp

from twistedlrp.jobs.client.calls import (
    CONNECTING,
    DEFAULT_TIMEOUT,
    DOWN,
    TRIES_PER_NODE,
    UP,
    Attempts,
    broke_during,
    no_answer,
)
from twistedlrp.jobs.client.link import JobLink
from twistedlrp.jobs.errors import AuthenticationFailed, JobServiceUnavailable, unsure
from twistedlrp.jobs.protocol import wire

log = Logger()

# After its connection broke during a call, that call may wait this long
# for the node's immediate reconnection (a restart, a dropped idle
# connection) to resend the request there, when no other node is up.
RECONNECT_WAIT = 2.0


class JobClient:
    """
    A L{JobLink} to each job node given, in order of preference. Each call
    goes to the first node that is up (before any first attempt ended, it
    waits for one); when its connection breaks during the call, the request
    goes again to the next node that is up, or to the same one once it
    reconnected (within L{RECONNECT_WAIT}), as L{Attempts} allows. When no
    node is up the call fails at once.

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
        return next((link for link in self.links if link.state == UP), None)

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
        """@return: the C{job_link} section of the health endpoint (C{healthy} if C{requires})."""
        now = self.reactor.seconds()
        wall = time.time()
        current = self.current()
        connecting = any(link.state == CONNECTING for link in self.links)
        state = UP if current is not None else CONNECTING if connecting else DOWN
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
        @return: the operation's answer (a job description, a list, stats).
        @raise JobError: the service's own error (a subclass says which).
        @raise JobServiceUnavailable: no node could be reached, or the
            connection broke (then the message says whether the outcome is unknown).
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
                attempts.broke(broke_during(link.endpoint, op, e))
                lost = link
            except amp.UnknownRemoteError as e:
                raise unsure(
                    f"the job service at {link.endpoint} failed during {op}: {e}", op
                ) from None
            except JobServiceUnavailable as e:
                attempts.refused(link, e, len(self.links))


def _iso(unix_time: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_time))
