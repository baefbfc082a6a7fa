"""
The job client: one persistent AMP connection to the job service, held by
the reactor through C{ClientService}, and the thread-safe facade the public
API (L{twistedlrp.jobs}) uses.

In the server, the job client service (L{twistedlrp.jobs.node}) installs a
client connected to the local job service (or to C{--jobs-connect}). In any
other process with Django set up, the first call creates one from
C{LRP_JOBS_CONNECT} (a client endpoint string), else
C{unix:path=<LRP_STATE_DIR or .lrp>/jobs.sock}; C{LRP_JOBS_SECRET_FILE}
names the shared secret for network endpoints. Each is read from the
environment first, then from the Django settings: a worker process is told
its own job service that way, whatever the settings say. C{LRP_JOBS_TIMEOUT}
(a setting, seconds, default 10) bounds reaching the service and each answer.
"""

from __future__ import annotations

import json
import os
import threading

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.protocols import amp

from twistedlrp import threads
from twistedlrp.jobs import wire
from twistedlrp.jobs.errors import (
    AuthenticationFailed,
    InvalidArguments,
    JobError,
    JobServiceUnavailable,
    PayloadTooLarge,
)

log = Logger()

DEFAULT_TIMEOUT = 10.0


class JobClient:
    """
    A persistent connection to one job service.

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
        if isinstance(endpoint, str):
            endpoint = clientFromString(reactor, endpoint)
        self.secret = secret
        self.timeout = timeout
        self.last_error: str | None = None
        self.auth_error: AuthenticationFailed | None = None
        self.service = ClientService(
            endpoint,
            _quiet_factory(),
            retryPolicy=backoffPolicy(initialDelay=0.05, maxDelay=1.0, factor=2.0),
            prepareConnection=self._prepare,
        )
        self.service.setName("twistedlrp-job-client")

    def start(self) -> None:
        self.service.startService()

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once the connection is closed."""
        return self.service.stopService()

    def _prepare(self, proto) -> defer.Deferred | None:
        if self.secret is None:
            self.last_error = None
            return None

        def ok(_):
            self.last_error = None
            self.auth_error = None

        def refused(failure):
            if failure.check(AuthenticationFailed):
                self.auth_error = failure.value
            self.last_error = failure.getErrorMessage()
            return failure

        return defer.ensureDeferred(wire.login(proto, self.secret)).addCallbacks(ok, refused)

    async def connected(self) -> amp.AMP:
        """
        @return: the connected protocol, within C{self.timeout}.
        @raise JobServiceUnavailable: not connected in time.
        @raise AuthenticationFailed: the service refused our secret.
        """
        deadline = self.reactor.seconds() + self.timeout
        while True:
            d = self.service.whenConnected(failAfterFailures=1)
            d.addTimeout(max(deadline - self.reactor.seconds(), 0.01), self.reactor)
            try:
                return await d
            except defer.TimeoutError:
                break
            except Exception as e:
                if self.auth_error is not None:
                    raise AuthenticationFailed(
                        f"the job service at {self.endpoint} refused the shared secret "
                        f"({self.auth_error})"
                    ) from None
                self.last_error = str(e) or type(e).__name__
            if self.reactor.seconds() >= deadline:
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
        command, answer_key, arguments = _COMMANDS[op](kw)
        d = proto.callRemote(command, **arguments)
        d.addTimeout(timeout or self.timeout, self.reactor)
        try:
            answer = await d
        except defer.TimeoutError:
            raise JobServiceUnavailable(
                f"the job service at {self.endpoint} did not answer {op} within "
                f"{timeout or self.timeout:g} s"
            ) from None
        except (error.ConnectionLost, error.ConnectionDone, amp.UnknownRemoteError) as e:
            raise JobServiceUnavailable(
                f"the connection to the job service at {self.endpoint} broke during {op}: {e}"
            ) from None
        return answer[answer_key]


_COMMANDS = {
    "submit": lambda kw: (
        wire.Submit,
        "job",
        {
            "name": kw["name"],
            "payload": kw["payload"],
            "priority": None if kw.get("priority") is None else int(kw["priority"]),
            "run_after": _float(kw.get("run_after")),
            "key": kw.get("key"),
            "timeout": _float(kw.get("timeout")),
        },
    ),
    "status": lambda kw: (wire.Status, "job", {"job_id": kw["job_id"]}),
    "cancel": lambda kw: (wire.Cancel, "job", {"job_id": kw["job_id"]}),
    "wait": lambda kw: (
        wire.Wait,
        "job",
        {"job_id": kw["job_id"], "timeout": float(kw["timeout"])},
    ),
    "list_jobs": lambda kw: (
        wire.ListJobs,
        "jobs",
        {"state": kw.get("state"), "name": kw.get("name"), "limit": kw.get("limit", 100)},
    ),
    "stats": lambda kw: (wire.Stats, "stats", {}),
}


def _float(value):
    return None if value is None else float(value)


# -- the process-wide client -------------------------------------------------------

_client: JobClient | None = None
_lock = threading.Lock()


def install(client: JobClient | None) -> None:
    """Make C{client} the one the public API uses in this process (the server does this)."""
    global _client
    _client = client


def configured(name: str) -> str | None:
    """@return: C{name} from the environment, else from the Django settings, else C{None}."""
    from django.conf import settings

    return os.environ.get(name) or getattr(settings, name, None) or None


def configured_endpoint(state_dir: str | None = None) -> str:
    """
    @return: the client endpoint string of the job service this process
        should reach: C{LRP_JOBS_CONNECT}, else the socket in C{state_dir}
        (or C{LRP_STATE_DIR}, or C{.lrp}).
    """
    endpoint = configured("LRP_JOBS_CONNECT")
    if endpoint:
        return endpoint
    state = state_dir or configured("LRP_STATE_DIR") or ".lrp"
    return unix_client_endpoint(os.path.join(state, "jobs.sock"))


def _settings_client() -> JobClient:
    """Build (in the reactor thread) this process's client from its configuration."""
    global _client
    if _client is None:
        from django.conf import settings
        from twisted.internet import reactor

        endpoint = configured_endpoint()
        secret_file = configured("LRP_JOBS_SECRET_FILE")
        secret = wire.read_secret(secret_file) if secret_file else None
        timeout = float(getattr(settings, "LRP_JOBS_TIMEOUT", DEFAULT_TIMEOUT))
        client = JobClient(reactor, endpoint, secret, timeout)
        client.start()
        _client = client
    return _client


def unix_client_endpoint(path: str) -> str:
    """@return: the client endpoint string of the UNIX socket at C{path}."""
    return "unix:path=" + os.path.abspath(path).replace("\\", "\\\\").replace(":", "\\:")


def call(op: str, call_timeout: float | None = None, **kw):
    """
    Run one job service operation from any thread but the reactor's.

    @return: the operation's answer.
    @raise InvalidArguments: submit arguments that are not JSON.
    @raise JobServiceUnavailable: the service cannot be reached or answer in time.
    @raise JobError: the service refused the operation (a subclass says why).
    """
    if op == "submit":
        kw["payload"] = encode_payload(kw.pop("args"), kw.pop("kwargs"))
    client = _client
    timeout = call_timeout or (client.timeout if client else DEFAULT_TIMEOUT)

    def run():
        target = _client or _settings_client()
        # Connecting and answering each get the client's timeout.
        return defer.ensureDeferred(target.request(op, kw, call_timeout))

    try:
        return threads.call_in_reactor(run, timeout=2 * timeout + 1)
    except TimeoutError as e:
        raise JobServiceUnavailable(f"the job service did not answer in time ({e})") from None


def encode_payload(args, kwargs) -> bytes:
    """
    @return: the JSON payload of a submission.
    @raise InvalidArguments: the arguments are not JSON-serialisable.
    @raise PayloadTooLarge: far beyond any limit the wire can carry.
    """
    try:
        payload = json.dumps(
            {"args": list(args), "kwargs": dict(kwargs)}, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as e:
        raise InvalidArguments(
            f"job arguments must be JSON (lists, dicts, strings, numbers, booleans, None): {e}"
        ) from None
    data = payload.encode()
    if len(data) > wire.CHUNK * wire.MAX_CHUNKS:
        raise PayloadTooLarge(f"the job's arguments take {len(data)} bytes of JSON")
    return data


__all__ = ["JobClient", "call", "install", "JobError"]


def _quiet_factory() -> protocol.Factory:
    factory = protocol.Factory.forProtocol(wire.QuietAMP)
    factory.noisy = False
    return factory
