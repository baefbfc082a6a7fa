"""The job listeners' limits (docs/protocol.md, "Limits"), and logs that a flood cannot flood."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionAborted
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs.errors import JobError
from twistedlrp.ordered_service import StartupFailed, cancel_call

# What a client may send before its login succeeds, in bytes (a login takes about 100).
PRE_LOGIN_BYTES = 4096
# Seconds a connection has to log in (the setting LRP_JOBS_LOGIN_TIMEOUT overrides it).
LOGIN_TIMEOUT = 10.0
# The listen queue of a TCP or TLS listener naming none (Twisted's is 50): once a
# flood fills it, the kernel drops new connections, a login's too, for a second or more.
LISTEN_BACKLOG = 1024
# After login, one AMP box may hold --max-job-payload bytes plus this much.
BOX_FRAMING = 256 * 1024
# Seconds the rest of a refused box is dropped (so that the client reads the error).
DISCARD_TIMEOUT = 10.0
# At most one warning of each kind of refusal per listener in this many seconds.
REFUSAL_LOG_INTERVAL = 5.0

_log = Logger()


@dataclass(frozen=True)
class Limits:
    """The limits of one listener (the module's constants by default)."""

    login_timeout: float = LOGIN_TIMEOUT
    # Connections that may wait to log in at once, in all and from one peer (see Gate).
    max_unauthenticated: int = 64
    max_unauthenticated_per_peer: int = 8


def describe_peer(address) -> str:
    """@return: C{host:port} of a TCP peer, C{"the UNIX socket"}, else the address as text."""
    if isinstance(address, IPv4Address | IPv6Address):
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{host}:{address.port}"
    if isinstance(address, UNIXAddress):
        return "the UNIX socket"
    return str(address)


@dataclass
class _Burst:
    logged_at: float
    left_out: int = 0  # from the first, a call to _summarize waits
    summary: Callable[[int], object] | None = None  # logs the count of those left out


class _Throttle:
    """At most one line per key every C{interval} s, then one counting those left out."""

    def __init__(self, clock=None, interval: float = REFUSAL_LOG_INTERVAL):
        self._clock = clock
        self.interval = interval
        self._keys: dict = {}

    @property
    def clock(self):
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def _left_out(self, key, summary: Callable[[int], object]) -> bool:
        """@return: whether this line is left out; the last C{summary} logs their count, later."""
        now = self.clock.seconds()
        state = self._keys.get(key)
        if state is None or (now - state.logged_at >= self.interval and not state.left_out):
            self._keys[key] = _Burst(now)
            return False
        state.left_out += 1
        state.summary = summary
        if state.left_out == 1:
            delay = max(state.logged_at + self.interval - now, 0)
            self.clock.callLater(delay, self._summarize, state)
        return True

    def _summarize(self, state: _Burst) -> None:
        state.summary(state.left_out)
        state.logged_at, state.left_out = self.clock.seconds(), 0


class RefusalLog(_Throttle):
    def __init__(self, clock, log: Logger, interval: float = REFUSAL_LOG_INTERVAL):
        super().__init__(clock, interval)
        self.log = log

    def warn(self, kind: str, format: str, **kwargs) -> None:
        """Log C{format} with C{kwargs} at WARNING, unless a refusal of C{kind} was just logged."""

        def summary(left_out: int) -> None:
            self.log.warn(
                format + " ({refusals_left_out} more like this in the last "
                "{refusal_interval:g} s, not logged one by one; this is the last)",
                refusals_left_out=left_out,
                refusal_interval=self.interval,
                **kwargs,
            )

        if not self._left_out(kind, summary):
            self.log.warn(format, **kwargs)


class FailureLog(_Throttle):
    """Tracebacks of internal errors: one per cause (operation, type, line) every C{interval} s."""

    def failure(self, log: Logger, failure: Failure, format: str, op: str, **kwargs) -> None:
        """Log C{failure} with C{format}, C{op} and C{kwargs}, unless its cause was just logged."""
        place = "{}:{}".format(*failure.frames[-1][1:3]) if failure.frames else "?"  # innermost
        message = failure.getErrorMessage()[:500]

        def summary(left_out: int) -> None:
            log.critical(
                format + " ({failures_left_out} more times, of the same cause ({error_type} at "
                "{error_place}), in the last {failure_interval:g} s; their tracebacks are not "
                "logged one by one; the last: {last_error})",
                op=op,
                failures_left_out=left_out,
                error_type=getattr(failure.type, "__qualname__", failure.type),
                error_place=place,
                failure_interval=self.interval,
                last_error=message,
                **kwargs,
            )

        if not self._left_out((log.namespace, op, failure.type, place), summary):
            log.failure(format, failure, op=op, **kwargs)


#: The job service's one L{FailureLog}: a traceback per cause a minute at most.
internal_errors = FailureLog(interval=60.0)


def guarded(log: Logger, op: str, fn, *args, what: str = "Job service") -> defer.Deferred:
    """@return: a Deferred of C{fn(*args)}, any error but a L{JobError} logged, made one."""

    def translate(failure):
        if failure.check(JobError):
            return failure
        internal_errors.failure(log, failure, what + " operation {op} failed", op=op)
        raise JobError(f"internal error in the job service: {failure.getErrorMessage()[:500]}")

    return defer.maybeDeferred(fn, *args).addErrback(translate)


class Gate:
    """
    One listener's connections waiting to log in. A new one is always taken,
    and makes room by closing the one that has waited longest: from its own
    address when that one is full (so that an address only pushes out its own).
    """

    def __init__(self, clock, listener: str, limits: Limits = Limits(), log: Logger | None = None):
        self.clock = clock
        self.listener = listener
        self.limits = limits
        self.refusals = RefusalLog(clock, log or Logger())
        # protocol -> (its peer's key, its login deadline), longest waiting first
        self._waiting: dict[object, tuple[str, object]] = {}
        self.evictions = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def waiting_from(self, address) -> int:
        return len(self._from(peer_key(address)))

    def _from(self, key: str) -> list:
        return [protocol for protocol, (its, _) in self._waiting.items() if its == key]

    def enter(self, protocol, address, expired: Callable[[], object]) -> None:
        """
        C{protocol} (a L{Guarded}), from C{address}, waits to log in; C{expired()}
        is called at its deadline.
        """
        key = peer_key(address)
        same = self._from(key)
        if len(same) >= self.limits.max_unauthenticated_per_peer:
            self._evict(
                same[0],
                "full-peer",
                "Job client {peer} closed on {listener}: {count} connections from {address} "
                "were waiting to log in, the most allowed from one address; a new one took "
                "the place of the one that had waited longest ({evictions} so far)",
                count=len(same),
                address=key,
            )
        elif len(self._waiting) >= self.limits.max_unauthenticated:
            self._evict(
                next(iter(self._waiting)),
                "full",
                "Job client {peer} closed on {listener}: {count} connections were waiting to "
                "log in, the most allowed; a new one took the place of the one that had waited "
                "longest ({evictions} so far)",
                count=len(self._waiting),
            )
        self._waiting[protocol] = (key, self.clock.callLater(self.limits.login_timeout, expired))

    def leave(self, protocol) -> None:
        """C{protocol} logged in, or its connection is lost (or evicted)."""
        _, deadline = self._waiting.pop(protocol, (None, None))
        cancel_call(deadline)

    def _evict(self, protocol, kind: str, format: str, **kwargs) -> None:
        self.leave(protocol)
        self.evictions += 1
        self.refusals.warn(
            kind,
            format,
            peer=describe_peer(protocol.peer),
            listener=self.listener,
            evictions=self.evictions,
            **kwargs,
        )
        protocol.evicted()
        if protocol.transport is not None:
            abort_now(protocol.transport)


def peer_key(address) -> str:
    """@return: what L{Gate} counts logins by: an IPv4 host, an IPv6 /64 (one site's), C{"unix"}."""
    if isinstance(address, IPv4Address):
        return address.host
    if isinstance(address, IPv6Address):
        try:
            ip = ipaddress.IPv6Address(address.host.split("%", 1)[0])
        except ValueError:
            return address.host
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    if isinstance(address, UNIXAddress):
        return "unix"
    return str(address)


def abort_now(transport) -> None:
    """Close a connection and free its descriptor now (one turn may accept hundreds)."""
    transport.abortConnection()
    # The socket's own transport, under TLS if any (it ignores abortConnection's later one).
    while getattr(transport, "socket", None) is None and getattr(transport, "transport", None):
        transport = transport.transport
    live = getattr(transport, "socket", None) is not None
    if live and not getattr(transport, "disconnected", False):
        transport.connectionLost(Failure(ConnectionAborted()))


class Guarded:
    """
    Mixed in before a listener's protocol: the connection waits at its L{Gate}
    (if any) until it logs in, and is closed on a refusal; C{client} names it in logs.
    """

    client = "Job client"
    gate: Gate | None = None
    peer = None
    authenticated = False
    _refused = False  # closing: whatever else arrives is dropped

    def connectionMade(self):
        super().connectionMade()
        self.peer = self.transport.getPeer()
        if not self.authenticated and self.gate is not None:
            self.gate.enter(self, self.peer, self._login_expired)

    def connectionLost(self, reason):
        if self.gate is not None:
            self.gate.leave(self)
        super().connectionLost(reason)

    def evicted(self) -> None:
        """The gate closes this connection to make room for a newer one."""
        self._refused = True

    def logged_in(self) -> None:
        self.authenticated = True
        if self.gate is not None:
            self.gate.leave(self)

    def warn(self, kind: str, what: str, **kwargs) -> None:
        """Log "C{client} C{peer} C{what}", rate-limited per listener and kind if it has a gate."""
        format = self.client + " {peer} " + what
        peer = describe_peer(self.peer)
        if self.gate is None:
            _log.warn(format, peer=peer, **kwargs)
        else:
            self.gate.refusals.warn(kind, format, peer=peer, **kwargs)

    def warn_pre_login_size(self) -> None:
        what = "sent more than {limit} bytes before logging in: disconnected"
        self.warn("pre-login-size", what, limit=PRE_LOGIN_BYTES)

    def warn_wrong_secret(self) -> None:
        self.warn("wrong-secret", "failed to log in (wrong secret): disconnected")

    def _close(self) -> None:
        self._refused = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _login_expired(self) -> None:
        # The gate cancels this call when the client logs in or its connection is lost.
        if self._refused:
            return
        timeout = self.gate.limits.login_timeout
        self.warn(
            "login-timeout", "did not log in within {timeout:g} s: disconnected", timeout=timeout
        )
        self._close()


class FrontEnd:
    """A listener of the job service, stopped by L{stop}."""

    port = None
    client_endpoint: str | None = None  # once listening, the client endpoint that reaches it

    def stop(self) -> defer.Deferred:
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


def with_backlog(endpoint: str) -> str:
    """@return: C{endpoint}, with C{backlog=}L{LISTEN_BACKLOG} if a TCP or TLS one names none."""
    kind, _, rest = endpoint.partition(":")
    named = any(part.startswith("backlog=") for part in rest.split(":"))
    if kind not in ("tcp", "tcp6", "ssl") or not rest or named:
        return endpoint
    return f"{endpoint}:backlog={LISTEN_BACKLOG}"


def configured_limits() -> Limits:
    """@return: the listeners' limits. @raise StartupFailed: a bad C{LRP_JOBS_LOGIN_TIMEOUT}."""
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
