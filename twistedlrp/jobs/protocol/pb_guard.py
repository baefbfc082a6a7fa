"""The PB listener's connections: input bounded as it arrives, bad calls refused quietly."""

from __future__ import annotations

import functools

from twisted.spread import pb

from twistedlrp import compat
from twistedlrp.jobs.protocol import limits
from twistedlrp.jobs.protocol.arguments import shown, shown_error


class GuardedBroker(compat.BrokerCallTargets, pb.Broker):
    """
    A PB server connection that bounds what the client sends before Banana buffers
    it; beyond, it closes (PB cannot answer what it has not decoded).
    """

    def __init__(self, gate: limits.Gate, max_message: int, **kwargs):
        super().__init__(**kwargs)
        self.gate = gate
        self.max_message = max_message
        self.authenticated = False
        self._received = 0  # before login: all bytes so far; after: those of this message
        self._expression_ended = False
        self._refused = False
        self._peer = "?"

    def connectionMade(self):
        peer = self.transport.getPeer()
        self._peer = limits.describe_peer(peer)
        self.gate.enter(self, peer, self._login_expired)
        super().connectionMade()

    def evicted(self) -> None:
        """The gate closes this connection to make room for a newer one."""
        self._refused = True

    def connectionLost(self, reason):
        self.gate.leave(self)
        super().connectionLost(reason)

    def logged_in(self) -> None:
        if not self.authenticated:
            self.authenticated = True
            self._received = 0
            self.gate.leave(self)

    def dataReceived(self, chunk):
        if self._refused:
            return
        self._received += len(chunk)
        if not self.authenticated and self._received > self.gate.limits.pre_login_bytes:
            self.warn(
                "pre-login-size",
                "PB job client {peer} sent more than {limit} bytes before logging in: disconnected",
                limit=self.gate.limits.pre_login_bytes,
            )
            return self._close()
        if self.authenticated and self._received > self.max_message:
            self.warn(
                "message-size",
                "PB job client {peer} sent a message of more than {limit} bytes (twice "
                "--max-job-payload plus framing): disconnected",
                limit=self.max_message,
            )
            return self._close()
        self._expression_ended = False
        try:
            super().dataReceived(chunk)
        except Exception as e:
            # What Banana or PB cannot read (PB would log a traceback each time).
            self.warn(
                "unreadable",
                "PB job client {peer} sent what Perspective Broker cannot read ({error}): "
                "disconnected",
                error=shown_error(e),
            )
            return self._close()
        if self._expression_ended and self.authenticated:
            # What follows a message's end in this chunk starts the next one.
            self._received = len(chunk) if self.listStack else len(self.buffer)

    def expressionReceived(self, sexp):
        self._expression_ended = True
        return super().expressionReceived(sexp)

    def call_target(self, target):
        return _Refusing(target)

    def _close(self) -> None:
        self._refused = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _login_expired(self) -> None:
        if self.authenticated or self._refused:
            return
        self.warn(
            "login-timeout",
            "PB job client {peer} did not log in within {timeout:g} s: disconnected",
            timeout=self.gate.limits.login_timeout,
        )
        self._close()

    def warn(self, kind: str, format: str, **kwargs) -> None:
        """A rate-limited warning (per listener and kind) about this client."""
        self.gate.refusals.warn(kind, format, peer=self._peer, **kwargs)


class _Refusing:
    """What a PB client calls: a call that cannot start is refused, without PB's traceback."""

    def __init__(self, target):
        self.target = target

    def remoteMessageReceived(self, broker, message, args, kw):
        from twistedlrp.jobs.pb import InvalidArgumentsError, JobServiceError

        try:
            return self.target.remoteMessageReceived(broker, message, args, kw)
        except pb.Error:
            raise
        except pb.NoSuchMethod:
            # Before login: only the login's methods are there.
            broker.warn(
                "before-login",
                "PB job client {peer} called {message} before logging in: refused",
                message=shown(message),
            )
            raise JobServiceError(
                f"{shown(message)}: no such method before login (the job service's operations "
                f"are its avatar's, which a login gives)"
            ) from None
        except Exception as e:
            broker.warn(
                "unreadable-call",
                "PB job client {peer} made a call that cannot be made ({message}: {error}): "
                "refused",
                message=shown(message),
                error=shown_error(e),
            )
            raise InvalidArgumentsError(
                f"{shown(message)}: the call cannot be made ({shown_error(e)})"
            ) from None


class GuardedPBServerFactory(pb.PBServerFactory):
    noisy = False

    def __init__(self, root, gate: limits.Gate, max_message: int):
        super().__init__(root)
        self.protocol = functools.partial(GuardedBroker, gate, max_message)
