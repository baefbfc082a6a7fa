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

from twistedlrp.services import StartupFailed

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
