"""
The job service's Perspective Broker front end (docs/protocol.md): what a
client sends bounded as it arrives, bad calls refused quietly. From Twisted::

    factory = pb.PBClientFactory()
    reactor.connectTCP(host, port, factory)
    avatar = await factory.login(credentials.UsernamePassword(b"lrp", secret))
    job = await avatar.callRemote("submit", "myapp.jobs.resize", [path, 800])
"""

from __future__ import annotations

import functools
import inspect

from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.spread import banana, pb
from zope.interface import implementer

from twistedlrp import compat
from twistedlrp.jobs import errors
from twistedlrp.jobs.client.calls import encode_payload
from twistedlrp.jobs.protocol import limits, wire
from twistedlrp.jobs.protocol.arguments import default_max_payload, shown, shown_error
from twistedlrp.ordered_service import StartupFailed

log = Logger()

__all__ = [
    "listen_pb", "PBFrontEnd", "JobServiceError", "NotRegisteredError", "UnknownJobError",
    "InvalidArgumentsError", "PayloadTooLargeError", "ServiceUnavailableError", "LoginRefused",
]  # fmt: skip


class JobServiceError(pb.Error):
    """The job service refused an operation (the message says why)."""


class NotRegisteredError(JobServiceError):
    """No job function is registered under this name; nothing was stored."""


class UnknownJobError(JobServiceError):
    """No job has this id."""


class InvalidArgumentsError(JobServiceError):
    """An argument is wrong, or the call does not fit the operation; nothing was stored."""


class PayloadTooLargeError(JobServiceError):
    """The arguments or the answer exceed a size limit."""


class ServiceUnavailableError(JobServiceError):
    """The job service cannot take work now (starting, stopping, not migrated)."""


class LoginRefused(error.UnauthorizedLogin, pb.Error):
    """The secret was wrong (a C{pb.Error}, which PB does not log as a traceback)."""


# Most specific first: Failure.trap returns the first class that matches.
_ERRORS = {
    errors.NotRegistered: NotRegisteredError,
    errors.UnknownJob: UnknownJobError,
    errors.InvalidArguments: InvalidArgumentsError,
    errors.PayloadTooLarge: PayloadTooLargeError,
    errors.JobServiceUnavailable: ServiceUnavailableError,
    errors.JobError: JobServiceError,
}


class GuardedBroker(limits.Guarded, compat.BrokerCallTargets, pb.Broker):
    """
    A PB server connection that bounds what the client sends before Banana buffers
    it; beyond, it closes (PB cannot answer what it has not decoded).
    """

    client = "PB job client"

    def __init__(self, gate: limits.Gate, max_message: int, **kwargs):
        super().__init__(**kwargs)
        self.gate = gate
        self.max_message = max_message
        self._received = 0  # before login: all bytes so far; after: those of this message
        self._expression_ended = False

    def logged_in(self) -> None:
        if not self.authenticated:
            self._received = 0
            super().logged_in()

    def dataReceived(self, chunk):
        if self._refused:
            return
        self._received += len(chunk)
        if not self.authenticated and self._received > limits.PRE_LOGIN_BYTES:
            self.warn_pre_login_size()
            return self._close()
        if self.authenticated and self._received > self.max_message:
            self.warn(
                "message-size",
                "sent a message of more than {limit} bytes (twice --max-job-payload plus "
                "framing): disconnected",
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
                "sent what Perspective Broker cannot read ({error}): disconnected",
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


class _Refusing:
    """What a PB client calls: a call that cannot start is refused, without PB's traceback."""

    def __init__(self, target):
        self.target = target

    def remoteMessageReceived(self, broker, message, args, kw):
        try:
            return self.target.remoteMessageReceived(broker, message, args, kw)
        except pb.Error:
            raise
        except pb.NoSuchMethod:
            # Before login: only the login's methods are there.
            broker.warn(
                "before-login",
                "called {message} before logging in: refused",
                message=shown(message),
            )
            raise JobServiceError(
                f"{shown(message)}: no such method before login (the job service's operations "
                f"are its avatar's, which a login gives)"
            ) from None
        except Exception as e:
            broker.warn(
                "unreadable-call",
                "made a call that cannot be made ({message}: {error}): refused",
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


@implementer(checkers.ICredentialsChecker)
class SecretChecker:
    """Accepts any user name with the shared secret; a wrong one closes the connection."""

    credentialInterfaces = (credentials.IUsernameHashedPassword,)

    def __init__(self, reactor, secret: bytes):
        self.reactor, self.secret = reactor, secret

    def requestAvatarId(self, creds):
        broker: GuardedBroker = creds.broker
        if creds.checkPassword(self.secret):
            broker.logged_in()
            return defer.succeed(creds.username)
        broker.warn_wrong_secret()
        if broker.transport is not None:
            # After the refusal has been written.
            self.reactor.callLater(0, broker.transport.loseConnection)
        return defer.fail(LoginRefused("login refused: wrong secret"))


@implementer(portal.IRealm)
class JobsRealm:
    """Gives every authenticated client a L{JobsAvatar} on the same service."""

    def __init__(self, service):
        self.service = service

    def requestAvatar(self, avatarId, mind, *interfaces):
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("the job service only offers pb.IPerspective")
        return pb.IPerspective, JobsAvatar(self.service), lambda: None


class JobsAvatar(pb.Avatar):
    """
    The public operations, for a logged-in client (C{submit} takes C{args} and
    C{kwargs}, not their JSON; C{list_jobs} answers the list).
    """

    def __init__(self, service):
        self.service = service

    def perspectiveMessageReceived(self, broker, message, args, kw):
        # A call that cannot be made is refused saying why (PB would log a traceback).
        try:
            args = broker.unserialize(args, self)
            kw = broker.unserialize(kw, self)
        except Exception as e:
            raise InvalidArgumentsError(
                f"{shown(message)}: the arguments cannot be read ({shown_error(e)})"
            ) from None
        signature = _SIGNATURES.get(message) if isinstance(message, str) else None
        if signature is None:
            raise InvalidArgumentsError(
                f"the job service has no operation {shown(message)}; it has {', '.join(OPERATIONS)}"
            )
        try:
            bound = signature.bind(*args, **kw)
        except TypeError as e:
            raise InvalidArgumentsError(f"{message}: {shown_error(e)}") from None
        bound.apply_defaults()
        return broker.serialize(self._call(message, bound.arguments), self, None, args, kw)

    def _call(self, name: str, arguments: dict) -> defer.Deferred:
        def translate(failure):
            # Every failure is a JobError here (limits.guarded).
            raise _ERRORS[failure.trap(*_ERRORS)](failure.getErrorMessage())

        fn = _submit if name == "submit" else wire.OPERATIONS[name].call
        d = limits.guarded(log, name, fn, self.service, arguments, what="PB job service")
        d.addCallbacks(_fits_banana, translate)
        return d.addCallback(lambda answer: answer["jobs"]) if name == "list_jobs" else d


def _signature(operation: wire.Operation) -> inspect.Signature:
    """@return: the PB signature of C{operation}: its arguments, with their defaults."""
    defaults = {}
    for name, argument in operation.command.arguments:
        name = name.decode()
        if name == "payload":
            # PB carries the arguments themselves: the service gets their JSON.
            defaults.update(args=(), kwargs=None)
        elif name not in operation.hidden:
            optional = name in operation.defaults or argument.optional
            defaults[name] = operation.defaults.get(name) if optional else inspect.Parameter.empty
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind, default=d) for n, d in defaults.items()])


_SIGNATURES = {op.name: _signature(op) for op in wire.OPERATIONS.values() if op.public}
OPERATIONS = tuple(_SIGNATURES)


def _submit(service, arguments: dict):
    args, kwargs = arguments["args"], arguments["kwargs"] or {}
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise errors.InvalidArguments("args must be a list and kwargs a dict")
    payload = encode_payload(args, kwargs)
    # The service checks every other value (and says which one is wrong).
    return wire.OPERATIONS["submit"].call(service, dict(arguments, payload=payload))


def _fits_banana(answer):
    """@return: C{answer}. @raise PayloadTooLargeError: it holds a value longer than PB carries."""
    stack = [answer]
    while stack:
        value = stack.pop()
        if isinstance(value, str | bytes | list | tuple | dict) and len(value) > banana.SIZE_LIMIT:
            raise PayloadTooLargeError(
                f"the answer holds a value of {len(value)} items or characters, more than "
                f"Perspective Broker can carry ({banana.SIZE_LIMIT}); use the AMP front end "
                f"or twistedlrp.jobs.get() for it"
            )
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return answer


def listen_pb(
    reactor, service, endpoint: str, secret: bytes, bounds: limits.Limits | None = None
) -> defer.Deferred:
    """Serve C{service} over PB on C{endpoint}. @return: a Deferred of the C{IListeningPort}."""
    if not secret:
        raise ValueError("the PB job service needs a non-empty shared secret")
    service = getattr(service, "operations", service)
    guard = portal.Portal(JobsRealm(service), [SecretChecker(reactor, secret)])
    gate = limits.Gate(reactor, endpoint, bounds or limits.Limits(), log)
    max_payload = getattr(service, "max_payload", None) or default_max_payload()
    # PB's encoding of a JSON value can take twice its JSON's size.
    factory = GuardedPBServerFactory(guard, gate, 2 * max_payload + limits.BOX_FRAMING)
    d = serverFromString(reactor, limits.with_backlog(endpoint)).listen(factory)

    def listening(port):
        log.info("Job service (Perspective Broker) listening on {endpoint}", endpoint=endpoint)
        return port

    return d.addCallback(listening)


class PBFrontEnd(limits.FrontEnd):
    """Listens for Perspective Broker job clients (always with a login: C{secret_file})."""

    def __init__(self, reactor, endpoint: str, secret_file: str | None):
        self.reactor, self.endpoint, self.secret_file = reactor, endpoint, secret_file

    async def listen(self, service) -> None:
        """@raise StartupFailed: no secret file, or the endpoint cannot listen."""
        if not self.secret_file:
            raise StartupFailed(
                f"--pb-listen {self.endpoint}: the Perspective Broker front end always requires "
                "a login: give --jobs-secret-file"
            )
        secret = wire.read_secret(self.secret_file)
        bounds = limits.configured_limits()
        try:
            self.port = await listen_pb(self.reactor, service, self.endpoint, secret, bounds)
        except Exception as e:
            raise StartupFailed(f"the job service cannot listen on {self.endpoint}: {e}") from e
