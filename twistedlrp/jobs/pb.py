"""
The job service's Perspective Broker front end.

A C{twisted.cred} portal guards it: a client logs in with the shared secret
of C{--jobs-secret-file} and gets an avatar offering the operations of the
AMP front end (C{submit}, C{status}, C{cancel}, C{wait}, C{list_jobs},
C{stats}); they call the job service's L{JobOperations}. From Twisted::

    factory = pb.PBClientFactory()
    reactor.connectTCP(host, port, factory)
    avatar = await factory.login(credentials.UsernamePassword(b"lrp", secret))
    job = await avatar.callRemote("submit", "myapp.jobs.resize", [path, 800])
    job = await avatar.callRemote("wait", job["id"], 60)

Answers are plain dicts, lists, strings and numbers (the job descriptions
of the AMP protocol); nothing but PB's basic types travels. Refusals are
L{JobServiceError} subclasses: on the client, C{failure.check(
"twistedlrp.jobs.pb.NotRegisteredError")} says which and
C{failure.getErrorMessage()} says why.

Login is PB's own challenge-response (see L{SecretChecker}): the secret
never crosses the wire. The user name is free (C{b"lrp"} by convention);
it only names the client in the logs.

What a client may send is bounded as it arrives (L{twistedlrp.jobs.protocol.pb_guard}): a few
KiB before its login succeeds, within a deadline, with bounds on the
connections waiting to log in at once, in all and per address (as on the
AMP listeners, see L{twistedlrp.jobs.protocol.limits.Gate}); after login, one message of at most twice
C{--max-job-payload} plus framing.
"""

from __future__ import annotations

import inspect

from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.spread import banana, pb
from zope.interface import implementer

from twistedlrp.jobs import errors
from twistedlrp.jobs.client.calls import encode_payload
from twistedlrp.jobs.protocol import limits, wire
from twistedlrp.jobs.protocol.arguments import DEFAULT_MAX_PAYLOAD, shown
from twistedlrp.jobs.protocol.pb_guard import GuardedBroker, GuardedPBServerFactory, shown_error
from twistedlrp.ordered_service import StartupFailed

log = Logger()

__all__ = [
    "listen_pb",
    "PBFrontEnd",
    "JobServiceError",
    "NotRegisteredError",
    "UnknownJobError",
    "InvalidArgumentsError",
    "PayloadTooLargeError",
    "ServiceUnavailableError",
    "LoginRefused",
]


class JobServiceError(pb.Error):
    """The job service refused an operation (the message says why)."""


class NotRegisteredError(JobServiceError):
    """No job function is registered under this name; nothing was stored."""


class UnknownJobError(JobServiceError):
    """No job has this id."""


class InvalidArgumentsError(JobServiceError):
    """
    An argument is of the wrong type or out of range, or the call does not
    fit the operation (or cannot be read); nothing was stored.
    """


class PayloadTooLargeError(JobServiceError):
    """The arguments or the answer exceed a size limit."""


class ServiceUnavailableError(JobServiceError):
    """The job service cannot take work now (starting, stopping, not migrated)."""


class LoginRefused(error.UnauthorizedLogin, pb.Error):
    """
    The secret was wrong. An C{UnauthorizedLogin} for the client; a
    C{pb.Error} so that PB does not log it as an unhandled traceback.
    """


# Most specific first: the first class that matches wins.
_ERRORS = [
    (errors.NotRegistered, NotRegisteredError),
    (errors.UnknownJob, UnknownJobError),
    (errors.InvalidArguments, InvalidArgumentsError),
    (errors.PayloadTooLarge, PayloadTooLargeError),
    (errors.JobServiceUnavailable, ServiceUnavailableError),
    (errors.JobError, JobServiceError),
]


@implementer(checkers.ICredentialsChecker)
class SecretChecker:
    """
    Accepts any user name with the shared secret, by challenge-response.

    PB never sends the password: C{PBClientFactory.login} asks the root
    object's C{remote_login(username)} for a challenge (C{pb.challenge()}:
    an MD5 digest of random bytes) and answers C{pb.respond(challenge,
    password)}, that is C{md5(md5(password) + challenge)}; the server side
    (C{pb._PortalAuthChallenger}, an C{IUsernameHashedPassword}) recomputes
    it in C{checkPassword}. So the secret is safe from a listener, but the
    exchange is MD5-based, its challenge comes from C{random}, not
    C{secrets}, and the digests are compared with C{==}: a short secret
    could be guessed offline from one recorded login. Use a long random secret, and a C{ssl:} endpoint across networks
    you do not trust.

    A wrong secret is refused and the connection is closed (as the AMP
    front end does), so a client cannot try secrets one after another on
    one connection.
    """

    credentialInterfaces = (credentials.IUsernameHashedPassword,)

    def __init__(self, reactor, secret: bytes):
        self.reactor = reactor
        self.secret = secret

    def requestAvatarId(self, creds):
        # PB's challenger (pb._PortalAuthChallenger) knows the connection.
        broker = getattr(creds, "broker", None)
        if creds.checkPassword(self.secret):
            if isinstance(broker, GuardedBroker):
                broker.logged_in()
            return defer.succeed(creds.username)
        if isinstance(broker, GuardedBroker):
            broker.warn(
                "wrong-secret", "PB job client {peer} failed to log in (wrong secret): disconnected"
            )
        else:
            peer = broker.transport.getPeer() if broker and broker.transport else "?"
            log.warn(
                "PB job client {peer} failed to log in (wrong secret): disconnected", peer=peer
            )
        if broker is not None and broker.transport is not None:
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
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else avatarId
        return pb.IPerspective, JobsAvatar(self.service, name), lambda: None


class JobsAvatar(pb.Avatar):
    """
    What a logged-in PB client may call: the public operations of
    L{wire.OPERATIONS}, with their arguments (C{submit} takes C{args} and
    C{kwargs} instead of their JSON); each returns (a Deferred of) what the
    AMP front end answers (C{list_jobs}: the list of jobs), or fails with a
    L{JobServiceError}.
    """

    def __init__(self, service, name: str = "lrp"):
        self.service = service
        self.name = name

    def perspectiveMessageReceived(self, broker, message, args, kw):
        """
        Run the operation C{message}; a call that cannot be made (arguments
        PB cannot read, an operation that does not exist, arguments that do
        not fit it) is refused with L{InvalidArgumentsError} saying why,
        without a traceback in the log (PB would log one each time).
        """
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
        if name == "submit":
            return _call(_submit, self.service, arguments)
        d = _call(wire.OPERATIONS[name].call, self.service, arguments, name=name)
        return d.addCallback(lambda answer: answer["jobs"]) if name == "list_jobs" else d


def _signature(operation: wire.Operation) -> inspect.Signature:
    """@return: the PB signature of C{operation}: its arguments, with their defaults."""
    parameters = []
    for name, argument in operation.command.arguments:
        name = name.decode()
        if name in operation.hidden:
            continue
        if name == "payload":
            # PB carries the arguments themselves: the service gets their JSON.
            parameters += [
                inspect.Parameter("args", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=()),
                inspect.Parameter("kwargs", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
            ]
            continue
        if name in operation.defaults or argument.optional:
            default = operation.defaults.get(name)
        else:
            default = inspect.Parameter.empty
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        )
    return inspect.Signature(parameters)


_SIGNATURES = {op.name: _signature(op) for op in wire.OPERATIONS.values() if op.public}
OPERATIONS = tuple(_SIGNATURES)


def _submit(service, arguments: dict):
    args, kwargs = arguments["args"], arguments["kwargs"] or {}
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise errors.InvalidArguments("args must be a list and kwargs a dict")
    payload = encode_payload(args, kwargs)
    # The service checks every other value (and says which one is wrong).
    return wire.OPERATIONS["submit"].call(service, dict(arguments, payload=payload))


def _call(fn, *args, name: str = "submit") -> defer.Deferred:
    """
    Run a service operation for a PB client (L{limits.guarded}): its errors
    become L{JobServiceError}s with the same message.
    """

    def translate(failure):
        for ours, theirs in _ERRORS:
            if failure.check(ours):
                raise theirs(failure.getErrorMessage())
        return failure

    d = limits.guarded(log, name, fn, *args, what="PB job service")
    return d.addCallbacks(_fits_banana, translate)


def _fits_banana(answer):
    """
    PB's wire format drops the connection on a string or list longer than
    C{banana.SIZE_LIMIT} (640 KiB); say so instead.

    @raise PayloadTooLargeError: some value of C{answer} is that long.
    """
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
    reactor,
    service,
    endpoint: str,
    secret: bytes,
    bounds: limits.Limits | None = None,
) -> defer.Deferred:
    """
    Serve C{service} over Perspective Broker on C{endpoint}.

    @param service: a L{twistedlrp.jobs.service.job_service.JobService},
        or the L{twistedlrp.jobs.service.handlers.JobOperations} it answers
        clients with.
    @param endpoint: a server endpoint string (C{tcp:8790:interface=127.0.0.1}).
    @param secret: the shared secret clients log in with (any user name).
    @param bounds: what clients may do before logging in (the defaults of
        L{twistedlrp.jobs.protocol.wire} if C{None}). After login, one message may
        hold twice C{service.max_payload} plus L{limits.BOX_FRAMING} bytes
        (PB's encoding of a JSON value can take twice its JSON's size).
    @return: a Deferred firing with the C{IListeningPort}, or failing when
        the endpoint cannot listen.
    @raise ValueError: C{secret} is empty.
    """
    if not secret:
        raise ValueError("the PB job service needs a non-empty shared secret")
    service = getattr(service, "operations", service)
    guard = portal.Portal(JobsRealm(service), [SecretChecker(reactor, secret)])
    gate = limits.Gate(reactor, endpoint, bounds or limits.Limits(), log)
    max_payload = getattr(service, "max_payload", DEFAULT_MAX_PAYLOAD)
    factory = GuardedPBServerFactory(guard, gate, 2 * max_payload + limits.BOX_FRAMING)
    d = serverFromString(reactor, limits.with_backlog(endpoint)).listen(factory)

    def listening(port):
        log.info("Job service (Perspective Broker) listening on {endpoint}", endpoint=endpoint)
        return port

    return d.addCallback(listening)


class PBFrontEnd:
    """
    Listens for Perspective Broker job clients (always with a login).

    @param endpoint: a server endpoint string.
    @param secret_file: the shared secret's file (required).
    """

    client_endpoint = None

    def __init__(self, reactor, endpoint: str, secret_file: str | None):
        self.reactor = reactor
        self.endpoint = endpoint
        self.secret_file = secret_file
        self.port = None

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

    def stop(self) -> defer.Deferred:
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
