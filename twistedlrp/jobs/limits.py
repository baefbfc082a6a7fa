"""
The limits of the job listeners (docs/protocol.md, "Limits"): what a client
may send before it logs in and for how long, how many may wait to log in at
once (L{Gate}), and warnings about refused clients that a flood cannot turn
into a flood of log lines (L{RefusalLog}). The AMP front end
(L{twistedlrp.jobs.amp}) and the Perspective Broker one (L{twistedlrp.jobs.pb})
apply them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.spread import pb

from twistedlrp.services import StartupFailed

# The default of --max-job-payload (for a service object that names none).
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# What a client may send before its login succeeds, in bytes, over all its
# boxes (or PB messages): a Challenge and a Login take about 100, PB's login
# about 100 plus the user name.
PRE_LOGIN_BYTES = 4096
# Seconds a connection has to log in before it is closed (the setting
# LRP_JOBS_LOGIN_TIMEOUT overrides it in the server).
LOGIN_TIMEOUT = 10.0
# Connections of one listener that may wait to log in at once; further ones
# are closed as soon as they are accepted.
MAX_UNAUTHENTICATED = 64
# After login, one AMP box may hold --max-job-payload bytes of payload plus
# this much for its other keys and the framing (a name and a key of up to
# 64 KiB each, 14 bytes per 65,000-byte piece).
BOX_FRAMING = 256 * 1024
# A refused box's rest is read and dropped (so that the client can read the
# error) for at most this many seconds before the connection is closed.
DISCARD_TIMEOUT = 10.0
# At most one warning of each kind of refusal per listener in this many seconds.
REFUSAL_LOG_INTERVAL = 5.0


@dataclass(frozen=True)
class Limits:
    """The limits of one listener (the module's constants by default)."""

    login_timeout: float = LOGIN_TIMEOUT
    pre_login_bytes: int = PRE_LOGIN_BYTES
    max_unauthenticated: int = MAX_UNAUTHENTICATED


def describe_peer(address) -> str:
    """@return: C{host:port} of a TCP peer, C{"the UNIX socket"}, else the address as text."""
    if isinstance(address, IPv4Address | IPv6Address):
        return (
            f"[{address.host}]:{address.port}"
            if ":" in address.host
            else (f"{address.host}:{address.port}")
        )
    if isinstance(address, UNIXAddress):
        return "the UNIX socket"
    return str(address)


@dataclass
class _Refusals:
    """The warnings of one kind of refusal (see L{RefusalLog})."""

    logged_at: float
    left_out: int = 0
    format: str = ""
    kwargs: dict | None = None
    summary: object = None  # the IDelayedCall that logs the count of those left out


class RefusalLog:
    """
    Warnings about refused clients, at most one of each kind every
    C{interval} seconds: a flood of refusals makes one line, and one more at
    the end of the interval that counts those left out (and shows the last).
    """

    def __init__(self, clock, log: Logger, interval: float = REFUSAL_LOG_INTERVAL):
        self.clock = clock
        self.log = log
        self.interval = interval
        self._kinds: dict[str, _Refusals] = {}

    def warn(self, kind: str, format: str, **kwargs) -> None:
        """Log C{format} with C{kwargs} at WARNING, unless a refusal of C{kind} was just logged."""
        now = self.clock.seconds()
        state = self._kinds.get(kind)
        if state is None or (now - state.logged_at >= self.interval and not state.left_out):
            self.log.warn(format, **kwargs)
            self._kinds[kind] = _Refusals(now)
            return
        state.left_out += 1
        state.format, state.kwargs = format, kwargs
        if state.summary is None:
            delay = max(state.logged_at + self.interval - now, 0)
            state.summary = self.clock.callLater(delay, self._summary, state)

    def _summary(self, state: _Refusals) -> None:
        self.log.warn(
            state.format + " ({refusals_left_out} more like this in the last "
            "{refusal_interval:g} s, not logged one by one; this is the last)",
            refusals_left_out=state.left_out,
            refusal_interval=self.interval,
            **state.kwargs,
        )
        state.logged_at, state.left_out, state.summary = self.clock.seconds(), 0, None


class Gate:
    """
    One listener's connections that have not logged in yet: at most
    C{limits.max_unauthenticated} at once (L{admit} says whether one more
    may), each closed after C{limits.login_timeout} seconds unless it logs
    in first; and the listener's L{RefusalLog}.

    @param listener: the listener's endpoint, for the messages.
    """

    def __init__(self, clock, listener: str, limits: Limits = Limits(), log: Logger | None = None):
        self.clock = clock
        self.listener = listener
        self.limits = limits
        self.refusals = RefusalLog(clock, log or Logger())
        self._waiting: dict[object, object] = {}  # protocol -> its deadline (an IDelayedCall)

    @property
    def waiting(self) -> int:
        """How many connections are waiting to log in."""
        return len(self._waiting)

    def admit(self, address) -> bool:
        """@return: whether a new connection (from C{address}) may wait to log in."""
        if len(self._waiting) < self.limits.max_unauthenticated:
            return True
        self.refusals.warn(
            "over-cap",
            "Job client {peer} refused on {listener}: {count} connections are already waiting "
            "to log in, the most allowed",
            peer=describe_peer(address),
            listener=self.listener,
            count=len(self._waiting),
        )
        return False

    def enter(self, protocol, expired: Callable[[], object]) -> None:
        """C{protocol}'s connection waits to log in; C{expired()} is called at its deadline."""
        self._waiting[protocol] = self.clock.callLater(self.limits.login_timeout, expired)

    def leave(self, protocol) -> None:
        """C{protocol} logged in, or its connection is lost (or refused)."""
        deadline = self._waiting.pop(protocol, None)
        if deadline is not None and deadline.active():
            deadline.cancel()


def configured_limits() -> Limits:
    """
    @return: the listeners' limits, with C{LRP_JOBS_LOGIN_TIMEOUT} from the
        Django settings (when they are configured).
    @raise StartupFailed: the setting is not a positive number.
    """
    from django.conf import settings

    value = getattr(settings, "LRP_JOBS_LOGIN_TIMEOUT", None) if settings.configured else None
    if value is None:
        return Limits()
    try:
        timeout = float(value)
        if not timeout > 0 or timeout == float("inf"):
            raise ValueError
    except (TypeError, ValueError):
        raise StartupFailed(
            f"LRP_JOBS_LOGIN_TIMEOUT: expected a positive number of seconds, got {value!r}"
        ) from None
    return Limits(login_timeout=timeout)


# -- Perspective Broker -------------------------------------------------------


class GuardedBroker(pb.Broker):
    """
    A PB server connection that bounds what the client sends, counted as it
    arrives (before Banana buffers or decodes it): before its login
    succeeds, C{gate.limits.pre_login_bytes} in all, within
    C{gate.limits.login_timeout} seconds; after it, C{max_message} bytes
    in one message (top-level Banana expression). Beyond, the connection
    is closed (PB has no error answer for a message it has not decoded).
    """

    def __init__(self, gate: Gate, max_message: int, **kwargs):
        super().__init__(isClient=False, **kwargs)
        self.gate = gate
        self.max_message = max_message
        self.authenticated = False
        self._received = 0  # before login: all bytes so far; after: those of this message
        self._expression_ended = False
        self._refused = False
        self._peer = "?"

    def connectionMade(self):
        self._peer = describe_peer(self.transport.getPeer())
        self.gate.enter(self, self._login_expired)
        super().connectionMade()

    def connectionLost(self, reason):
        self.gate.leave(self)
        super().connectionLost(reason)

    def logged_in(self) -> None:
        """The client's login succeeded (L{SecretChecker} says so)."""
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
        super().dataReceived(chunk)
        if self._expression_ended and self.authenticated:
            # A message ended in this chunk: what follows it (in the
            # chunk) is the start of the next one.
            self._received = len(chunk) if self.listStack else len(self.buffer)

    def expressionReceived(self, sexp):
        self._expression_ended = True
        return super().expressionReceived(sexp)

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


class GuardedPBServerFactory(pb.PBServerFactory):
    """
    A C{PBServerFactory} of L{GuardedBroker}s; a connection beyond the
    number that may wait to log in is closed as soon as it is accepted.
    """

    noisy = False

    def __init__(self, root, gate: Gate, max_message: int):
        super().__init__(root)
        self.gate = gate
        self.max_message = max_message

    def buildProtocol(self, addr):
        if not self.gate.admit(addr):
            return None  # the transport closes the socket at once
        proto = GuardedBroker(self.gate, self.max_message, security=self.security)
        proto.factory = self
        proto.setNameForLocal("root", self.root.rootObject(proto))
        return proto
