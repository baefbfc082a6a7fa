"""
The job client in a reactor (L{JobClient}): one persistent AMP connection
to the job service, kept by the reactor. It connects at start and again
whenever the connection is lost; while the service cannot be reached it
retries in the background with back-off (up to 30 s), logging one warning,
then one line when it connects again; a request in the meantime tries at
once. L{twistedlrp.jobs.client} holds the process's client and the
thread-safe facade the public API uses.
"""

from __future__ import annotations

import os

from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistedlrp.jobs import wire
from twistedlrp.jobs.client import COMMANDS, DEFAULT_TIMEOUT, UNKNOWN_OUTCOME, no_answer, unix_path
from twistedlrp.jobs.errors import AuthenticationFailed, JobError, JobServiceUnavailable

log = Logger()

# Reconnection back-off: from a blink to half a minute.
_FIRST_RETRY = 0.05
_MAX_RETRY = 30.0


class JobClient:
    """
    A persistent connection to one job service.

    It connects at L{start} and again whenever the connection is lost. While
    the service cannot be reached it retries in the background with
    back-off (up to 30 s) and logs one warning, then one line when it
    connects again; a request in the meantime tries at once.

    @param endpoint: a client endpoint string, or an C{IStreamClientEndpoint}
        (then C{description} names it in messages).
    @param secret: the shared secret, or C{None} (no Login; fine on a UNIX socket).
    """

    def __init__(
        self,
        reactor,
        endpoint,
        secret: bytes | None,
        timeout: float = DEFAULT_TIMEOUT,
        description: str | None = None,
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
        self.last_error: str | None = None
        self._protocol: _ClientAMP | None = None
        self._connecting: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._retry = None
        self._delay = _FIRST_RETRY
        self._unreachable_since: float | None = None
        self._stopped = True
        self._closed: defer.Deferred | None = None

    def start(self) -> None:
        self._stopped = False
        # A failure is logged (once) by _unreachable; nobody waits for this one.
        self._connect().addErrback(lambda failure: None)

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once the connection is closed."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return defer.succeed(None)
        self._closed = defer.Deferred()
        protocol.transport.loseConnection()
        return self._closed

    # -- connecting ----------------------------------------------------------------

    def _connect(self) -> defer.Deferred:
        """@return: a Deferred firing with the logged-in protocol, or failing."""
        if self._protocol is not None:
            return defer.succeed(self._protocol)
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        if self._connecting is None:
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._connecting = defer.ensureDeferred(self._attempt())
            self._connecting.addBoth(self._attempted)
        return waiter

    async def _attempt(self):
        protocol = await self._connector.connect(_ClientFactory(self._lost))
        if self.secret is not None:
            try:
                await wire.login(protocol, self.secret)
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.loseConnection()
                raise
        return protocol

    def _attempted(self, outcome) -> None:
        self._connecting = None
        waiting, self._waiting = self._waiting, []
        if isinstance(outcome, Failure):
            if outcome.check(defer.CancelledError) and self._stopped:
                outcome = Failure(JobServiceUnavailable("the job client is stopped"))
            self.last_error = _reason(outcome)
            self._unreachable(outcome)
            for d in waiting:
                d.errback(outcome)
            return
        self._protocol = outcome
        self.last_error = None
        self._delay = _FIRST_RETRY
        if self._unreachable_since is not None:
            log.info(
                "Connected to the job service at {endpoint} again (after {seconds:.1f} s)",
                endpoint=self.endpoint,
                seconds=self.reactor.seconds() - self._unreachable_since,
            )
            self._unreachable_since = None
        for d in waiting:
            d.callback(outcome)

    def _unreachable(self, failure: Failure) -> None:
        if self._stopped:
            return
        if self._unreachable_since is None:
            self._unreachable_since = self.reactor.seconds()
            log.warn(
                "Cannot reach the job service at {endpoint} ({reason}); retrying in the "
                "background, up to every {most:g} s",
                endpoint=self.endpoint,
                reason=self.last_error,
                most=_MAX_RETRY,
            )
        self._retry = self.reactor.callLater(self._delay, self._retry_now)
        self._delay = min(self._delay * 2, _MAX_RETRY)

    def _retry_now(self) -> None:
        self._retry = None
        if not self._stopped:
            self._connect().addErrback(lambda failure: None)

    def _lost(self, protocol) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._closed is not None:
            closed, self._closed = self._closed, None
            closed.callback(None)
        if self._stopped:
            return
        log.warn("Lost the connection to the job service at {endpoint}", endpoint=self.endpoint)
        self._unreachable_since = self.reactor.seconds()
        self._delay = _FIRST_RETRY
        self._retry = self.reactor.callLater(0, self._retry_now)

    async def connected(self) -> amp.AMP:
        """
        @return: the connected protocol, within C{self.timeout}.
        @raise JobServiceUnavailable: not connected in time, or at once when
            the service's UNIX socket does not exist.
        @raise AuthenticationFailed: the service refused our secret.
        """
        if self._protocol is not None:
            return self._protocol
        if self._socket_path is not None and not os.path.exists(self._socket_path):
            raise JobServiceUnavailable(
                f"the job service at {self.endpoint} could not be reached: its socket does "
                f"not exist (is the server running, with this --state-dir or LRP_STATE_DIR?)"
            )
        deadline = self.reactor.seconds() + self.timeout
        while True:
            d = self._connect()
            d.addTimeout(max(deadline - self.reactor.seconds(), 0.01), self.reactor)
            try:
                return await d
            except defer.TimeoutError:
                break
            except AuthenticationFailed as e:
                raise AuthenticationFailed(
                    f"the job service at {self.endpoint} refused the shared secret ({e})"
                ) from None
            except JobError:
                raise
            except Exception:
                pass
            if self.reactor.seconds() >= deadline or self._stopped:
                break
            await task.deferLater(self.reactor, 0.05, lambda: None)
        raise JobServiceUnavailable(
            f"the job service at {self.endpoint} could not be reached within "
            f"{self.timeout:g} s" + (f" ({self.last_error})" if self.last_error else "")
        )

    async def request(self, op: str, kw: dict, timeout: float | None = None):
        """
        Send one operation.

        @return: the operation's answer (a job description, a list, stats).
        @raise JobError: the service's own error (a subclass says which).
        @raise JobServiceUnavailable: unreachable, or the connection broke.
        """
        proto = await self.connected()
        command, answer_key, arguments = COMMANDS[op](kw)
        d = proto.callRemote(command, **arguments)
        d.addTimeout(timeout or self.timeout, self.reactor)
        try:
            answer = await d
        except defer.TimeoutError:
            raise no_answer(self.endpoint, op, timeout or self.timeout) from None
        except (error.ConnectionLost, error.ConnectionDone, amp.UnknownRemoteError) as e:
            raise JobServiceUnavailable(
                f"the connection to the job service at {self.endpoint} broke during {op}: {e}"
                + UNKNOWN_OUTCOME.get(op, "")
            ) from None
        return answer[answer_key]


class _ClientAMP(wire.QuietAMP):
    def __init__(self, on_lost):
        super().__init__()
        self._on_lost = on_lost

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self._on_lost(self)


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, on_lost):
        self._on_lost = on_lost

    def buildProtocol(self, addr):
        return _ClientAMP(self._on_lost)


def _reason(failure: Failure) -> str:
    return failure.getErrorMessage() or failure.type.__name__
