"""The job service's AMP commands (docs/protocol.md), each operation named once; JSON, no pickle."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

from twisted.protocols import amp

from twistedlrp.jobs.errors import (
    AuthenticationFailed,
    InvalidArguments,
    JobError,
    JobServiceUnavailable,
    NotRegistered,
    PayloadTooLarge,
    UnknownJob,
)
from twistedlrp.jobs.protocol.arguments import shown_error
from twistedlrp.jobs.protocol.framing import get_big, put_big

# A sanity bound on one value (about 130 MB); the service checks --max-job-payload.
MAX_CHUNKS = 2000


def _python_name(name: bytes) -> str:
    return name.decode("ascii").replace("-", "_")


class BigBytes(amp.Argument):
    """Bytes of any size, split over several AMP keys (L{framing.put_big}); never optional."""

    def toBox(self, name, strings, objects, proto):
        value = objects.pop(_python_name(name), None)
        if value is None:
            raise ValueError(f"missing value for {name!r}")
        put_big(strings, name, self.encode(value))

    def fromBox(self, name, strings, objects, proto):
        objects[_python_name(name)] = self.decode(get_big(strings, name, MAX_CHUNKS))

    def encode(self, value) -> bytes:
        return value

    def decode(self, data: bytes):
        return data


class BigJSON(BigBytes):
    """A JSON value of any size (see L{BigBytes})."""

    def encode(self, value) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def decode(self, data: bytes):
        return json.loads(data)


class QuietAMP(amp.BinaryBoxProtocol, amp.BoxDispatcher, amp.CommandLocator):
    """C{amp.AMP} from its public parts, without its info line for every connection."""

    def __init__(self):
        amp.BoxDispatcher.__init__(self, self)
        amp.BinaryBoxProtocol.__init__(self, self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.transport = None


ERRORS = {
    UnknownJob: b"UNKNOWN_JOB",
    NotRegistered: b"NOT_REGISTERED",
    InvalidArguments: b"INVALID_ARGUMENTS",
    PayloadTooLarge: b"PAYLOAD_TOO_LARGE",
    JobServiceUnavailable: b"UNAVAILABLE",
    # Also fatal (below); listed here so that it is matched before JobError.
    AuthenticationFailed: b"AUTHENTICATION_FAILED",
    # Last: any other JobError (a trap returns the first class that matches).
    JobError: b"JOB_ERROR",
}
FATAL_ERRORS = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


class _Command(amp.Command):
    """
    A command whose unreadable argument is answered INVALID_ARGUMENTS (not with
    AMP's traceback), closing the connection before login.
    """

    errors = ERRORS
    fatalErrors = FATAL_ERRORS

    @classmethod
    def parseArguments(cls, box, protocol):
        strings = box.copy()
        objects: dict = {}
        for name, argument in cls.arguments:
            try:
                argument.fromBox(name, strings, objects, protocol)
            except Exception as e:
                field = name.decode("ascii", "replace")
                if isinstance(e, KeyError) and name not in box:
                    message = f"{field}: missing"
                else:
                    message = f"{field}: cannot be read ({shown_error(e, 160)})"
                fatal = not getattr(protocol, "authenticated", True)
                code = ERRORS[InvalidArguments]
                raise amp.RemoteAmpError(code, message, fatal=fatal) from None
        return objects


class Challenge(_Command):
    """@return: C{nonce}, fresh random bytes to answer in L{Login}."""

    arguments = []
    response = [(b"nonce", amp.String())]


class Login(_Command):
    """Prove knowledge of the secret: C{digest = HMAC-SHA256(secret, nonce)}."""

    arguments = [(b"digest", amp.String())]
    response = [(b"ok", amp.Boolean())]


class Submit(_Command):
    """Store and queue a job, C{payload} its JSON C{{"args": [...], "kwargs": {...}}}."""

    arguments = [
        (b"name", amp.Unicode()),
        (b"payload", BigBytes()),
        (b"priority", amp.Integer(optional=True)),
        (b"run_after", amp.Float(optional=True)),
        (b"key", amp.Unicode(optional=True)),
        (b"timeout", amp.Float(optional=True)),
        # A UUID the client chose: the same id submitted again returns the same job.
        (b"id", amp.Unicode(optional=True)),
        # The client's time left, so that a refusal still lets it say "not stored".
        (b"wait", amp.Float(optional=True)),
    ]
    response = [(b"job", BigJSON())]


class Announce(_Command):
    """The client committed these jobs in its own transaction: queue them (answered at once)."""

    arguments = [(b"job_ids", amp.ListOf(amp.Unicode()))]
    response = [(b"ok", amp.Boolean())]


class Status(_Command):
    arguments = [(b"job_id", amp.Unicode())]
    response = [(b"job", BigJSON())]


class Cancel(_Command):
    arguments = [(b"job_id", amp.Unicode())]
    response = [(b"job", BigJSON())]


class Wait(_Command):
    """Answered when the job finishes, after C{timeout} s, or when it differs from C{seen}."""

    arguments = [
        (b"job_id", amp.Unicode()),
        (b"timeout", amp.Float()),
        (b"seen", amp.Unicode(optional=True)),
    ]
    response = [(b"job", BigJSON())]


def seen_mark(job: dict) -> str:
    """@return: a short digest of the job's state and progress, for C{Wait}'s C{seen}."""
    seen = json.dumps([job["state"], list(job.get("progress") or ())], separators=(",", ":"))
    return hashlib.sha256(seen.encode()).hexdigest()[:32]


class ListJobs(_Command):
    arguments = [
        (b"state", amp.Unicode(optional=True)),
        (b"name", amp.Unicode(optional=True)),
        (b"limit", amp.Integer()),
    ]
    response = [(b"jobs", BigJSON())]


class Stats(_Command):
    arguments = []
    response = [(b"stats", BigJSON())]


@dataclass(frozen=True)
class Operation:
    """
    One operation of the job service, named once: clients, AMP responders and
    the PB avatar derive from it. The service's method of the same name takes
    the C{command}'s arguments in order and answers its only response key.
    C{hidden}: arguments PB does not take; C{public}: offered through PB and eager mode.
    """

    name: str
    command: type[amp.Command]
    defaults: dict = field(default_factory=dict)
    hidden: tuple[str, ...] = ()
    public: bool = True

    @property
    def parameters(self) -> list[str]:
        return [_python_name(name) for name, _ in self.command.arguments]

    @property
    def answer(self) -> str:
        return _python_name(self.command.response[0][0])

    def arguments(self, kw: dict, encoded: bool = False) -> dict:
        """
        @param encoded: for AMP: a number it sends as a float is made one.
        @return: the command's arguments from C{kw}. @raise KeyError: a required one is missing.
        """
        values = {}
        for key, argument in self.command.arguments:
            name = _python_name(key)
            if name not in kw and name not in self.defaults and not argument.optional:
                raise KeyError(name)
            value = kw.get(name, self.defaults.get(name))
            if encoded and value is not None and isinstance(argument, amp.Float):
                value = float(value)
            values[name] = value
        return values

    def call(self, target, arguments: dict):
        """@return: what C{target}'s method of this operation answers to C{arguments}."""
        return getattr(target, self.name)(*(arguments.get(p) for p in self.parameters))


OPERATIONS = {
    op.name: op
    for op in (
        Operation("submit", Submit, hidden=("wait",)),
        Operation("announce", Announce, public=False),
        Operation("status", Status),
        Operation("cancel", Cancel),
        Operation("wait", Wait, defaults={"timeout": 60.0}, hidden=("seen",)),
        Operation("list_jobs", ListJobs, defaults={"limit": 100}),
        Operation("stats", Stats),
    )
}


class WorkerReady(amp.Command):
    """Child → parent: Django is set up and jobs can run."""

    arguments = [(b"pid", amp.Integer())]
    response = []


class RunJob(amp.Command):
    """Parent → child: run one job; answered with its C{outcome} (L{workers.main.call_job})."""

    arguments = [
        (b"job_id", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"payload", BigBytes()),
        (b"attempt", amp.Integer()),
        # The module the server registered the job from.
        (b"module", amp.Unicode(optional=True)),
    ]
    response = [(b"outcome", BigJSON())]


class CancelJob(amp.Command):
    """Parent → child: make L{twistedlrp.jobs.cancelled} true for this job."""

    arguments = [(b"job_id", amp.Unicode())]
    requiresAnswer = False


class ReportProgress(amp.Command):
    """Child → parent: the running job's progress."""

    arguments = [
        (b"job_id", amp.Unicode()),
        (b"current", amp.Integer()),
        (b"total", amp.Integer(optional=True)),
        (b"message", amp.Unicode()),
    ]
    requiresAnswer = False


def digest(secret: bytes, nonce: bytes) -> bytes:
    """@return: the Login answer to C{nonce}: HMAC-SHA256 of it keyed with C{secret}."""
    return hmac.new(secret, b"twistedlrp-jobs-login:" + nonce, hashlib.sha256).digest()


def read_secret(path: str) -> bytes:
    """@return: the secret in the file C{path}, stripped. @raise ValueError: it is empty."""
    with open(path, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"the job secret file {path} is empty")
    return secret


async def login(protocol: amp.BoxDispatcher, secret: bytes) -> None:
    """@raise AuthenticationFailed: the service refused the secret (and closed the connection)."""
    answer = await protocol.callRemote(Challenge)
    await protocol.callRemote(Login, digest=digest(secret, answer["nonce"]))
