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

Outside the server (a script, a worker's job, another WSGI server) a
C{unix:} or C{tcp:} endpoint is reached without a reactor: the calling
thread writes its request to the process's one AMP connection itself and a
reader thread hands it the answer (L{BlockingClient}), one thread hop
instead of the two to a reactor thread and back.
Other endpoint types (TLS) go through a L{JobClient} in a reactor thread.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

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
        self._socket_path = _unix_path(endpoint) if isinstance(endpoint, str) else None
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
        command, answer_key, arguments = _COMMANDS[op](kw)
        d = proto.callRemote(command, **arguments)
        d.addTimeout(timeout or self.timeout, self.reactor)
        try:
            answer = await d
        except defer.TimeoutError:
            raise JobServiceUnavailable(
                f"the job service at {self.endpoint} did not answer {op} within "
                f"{timeout or self.timeout:g} s" + _UNKNOWN_OUTCOME.get(op, "")
            ) from None
        except (error.ConnectionLost, error.ConnectionDone, amp.UnknownRemoteError) as e:
            raise JobServiceUnavailable(
                f"the connection to the job service at {self.endpoint} broke during {op}: {e}"
                + _UNKNOWN_OUTCOME.get(op, "")
            ) from None
        return answer[answer_key]


class LocalClient:
    """
    The job service of this very process, called directly: a view's call
    runs the service's method in the reactor (through
    L{twistedlrp.threads.call_in_reactor}, as every call does) without AMP,
    a socket or a second reactor turn. Answers and errors are those of
    L{JobClient.request}; the answer is a copy (as if it had crossed the
    wire), and the service's unexpected errors become a L{JobError}, as the
    AMP front end makes them.

    @param service: the L{twistedlrp.jobs.service.JobService}.
    @param description: the endpoint named in messages.
    """

    def __init__(self, reactor, service, timeout: float, description: str):
        self.reactor = reactor
        self.service = service
        self.timeout = timeout
        self.endpoint = description
        self.last_error: str | None = None

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    async def request(self, op: str, kw: dict, timeout: float | None = None):
        """
        @return: the operation's answer.
        @raise JobError: the service's own error (a subclass says which).
        @raise JobServiceUnavailable: the service did not answer in time.
        """
        limit = timeout or self.timeout
        listening = self.service.when_listening()
        if not listening.called:
            # Starting: wait for it, as a connection to it would.
            listening.addTimeout(limit, self.reactor)
            try:
                await listening
            except defer.TimeoutError:
                raise JobServiceUnavailable(
                    f"the job service at {self.endpoint} could not be reached within "
                    f"{limit:g} s (it is starting)"
                ) from None
        _, _, arguments = _COMMANDS[op](kw)
        method, args = _LOCAL[op](arguments)
        d = defer.maybeDeferred(getattr(self.service, method), *args)
        d.addTimeout(limit, self.reactor)
        try:
            answer = await d
        except defer.TimeoutError:
            raise JobServiceUnavailable(
                f"the job service at {self.endpoint} did not answer {op} within "
                f"{limit:g} s" + _UNKNOWN_OUTCOME.get(op, "")
            ) from None
        except JobError:
            raise
        except Exception as e:
            log.failure("Job service operation {op} failed", op=method)
            raise JobError(f"internal error in the job service: {e}") from None
        # A copy, as the wire gives each caller its own.
        return json.loads(json.dumps(answer))


# The service's method for each operation, and its arguments in order.
_LOCAL = {
    "submit": lambda a: (
        "submit",
        (a["name"], a["payload"], a["priority"], a["run_after"], a["key"], a["timeout"], a["id"]),
    ),
    "status": lambda a: ("status", (a["job_id"],)),
    "cancel": lambda a: ("cancel", (a["job_id"],)),
    "wait": lambda a: ("wait", (a["job_id"], a["timeout"])),
    "list_jobs": lambda a: ("list_jobs", (a["state"], a["name"], a["limit"])),
    "stats": lambda a: ("stats", ()),
}


# What a caller must know when an answer is lost: the request may have taken effect.
_UNKNOWN_OUTCOME = {
    "submit": "; the job may or may not have been stored: submit again with the same id "
    "(or key) to get the same job instead of a second one",
    "cancel": "; the cancellation may or may not have been requested: cancel again",
}

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
            "id": kw.get("id"),
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
    if client is None and threads._mode != "server":
        blocking = _blocking_client()
        if blocking is not None:
            return blocking.request(op, kw, call_timeout)
    timeout = call_timeout or (client.timeout if client else DEFAULT_TIMEOUT)

    def run():
        target = _client or _settings_client()
        # Connecting and answering each get the client's timeout.
        return defer.ensureDeferred(target.request(op, kw, call_timeout))

    try:
        return threads.call_in_reactor(run, timeout=2 * timeout + 1)
    except TimeoutError as e:
        raise JobServiceUnavailable(f"the job service did not answer in time ({e})") from None


# -- without a reactor ----------------------------------------------------------------

_blocking: BlockingClient | None = None
_NO_BLOCKING = object()


def _blocking_client() -> BlockingClient | None:
    """@return: this process's L{BlockingClient}, or C{None} if its endpoint needs a reactor."""
    global _blocking
    if _blocking is None:
        with _lock:
            if _blocking is None:
                from django.conf import settings

                endpoint = configured_endpoint()
                address = socket_address(endpoint)
                if address is None:
                    _blocking = _NO_BLOCKING
                else:
                    secret_file = configured("LRP_JOBS_SECRET_FILE")
                    secret = wire.read_secret(secret_file) if secret_file else None
                    timeout = float(getattr(settings, "LRP_JOBS_TIMEOUT", DEFAULT_TIMEOUT))
                    _blocking = BlockingClient(endpoint, address, secret, timeout)
    return None if _blocking is _NO_BLOCKING else _blocking


def socket_address(endpoint: str) -> tuple[int, object] | None:
    """
    @return: C{(address family, address)} of a C{unix:} or C{tcp:} client
        endpoint string, or C{None} for any other (or one with options a
        plain socket does not have, such as C{bindAddress}).
    """
    parts = _split_endpoint(endpoint)
    kind, rest = parts[0], parts[1:]
    positional = [p for p in rest if "=" not in p]
    named = dict(p.split("=", 1) for p in rest if "=" in p)
    if set(named) - {"host", "port", "path", "timeout", "lockfile", "checkPID"}:
        return None
    if kind == "unix":
        path = named.get("path") or (positional[0] if positional else None)
        return (socket.AF_UNIX, path) if path else None
    if kind == "tcp":
        host = named.get("host") or (positional[0] if positional else None)
        port = named.get("port") or (positional[1] if len(positional) > 1 else None)
        if not host or not port or not port.isdigit():
            return None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, int(port))
    return None


class BlockingClient:
    """
    One AMP connection to one job service (a UNIX or TCP socket) that every
    thread of the process shares without a reactor: a caller writes its
    request itself and waits; a reader thread hands each answer to the
    caller that waits for it. It connects at the first call and again after
    the connection broke. Its answers and errors are those of
    L{JobClient.request}. (One shared connection, like the reactor's, lets
    the service read the requests of many threads at once and commit them
    together.)

    @param address: C{(family, address)} (L{socket_address}).
    @param secret: the shared secret (Login after each connect), or C{None}.
    """

    def __init__(self, endpoint: str, address, secret: bytes | None, timeout: float):
        self.endpoint = endpoint
        self.family, self.address = address
        self.secret = secret
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conversation: _Conversation | None = None

    def request(self, op: str, kw: dict, timeout: float | None = None):
        """
        Send one operation and wait for its answer.

        @return: the operation's answer.
        @raise JobError: the service's own error (a subclass says which).
        @raise JobServiceUnavailable: unreachable, or the connection broke.
        """
        command, answer_key, arguments = _COMMANDS[op](kw)
        for attempt in (1, 2):
            conversation = self._connected()
            box = command.makeArguments(arguments, None)
            try:
                answer = conversation.ask(command, box, timeout or self.timeout, op)
            except _NotSent:
                # It broke before our request left: nothing happened; once more.
                if attempt == 2:
                    raise JobServiceUnavailable(
                        f"the connection to the job service at {self.endpoint} broke before "
                        f"{op} could be sent"
                    ) from None
                continue
            return answer[answer_key]

    def _connected(self) -> _Conversation:
        with self._lock:
            conversation = self._conversation
            if conversation is not None and conversation.usable():
                return conversation
            self._conversation = None
            conversation = self._connect()
            self._conversation = conversation
            return conversation

    def _connect(self) -> _Conversation:
        if self.family == socket.AF_UNIX and not os.path.exists(self.address):
            raise JobServiceUnavailable(
                f"the job service at {self.endpoint} could not be reached: its socket does "
                f"not exist (is the server running, with this --state-dir or LRP_STATE_DIR?)"
            )
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                sock.connect(self.address)
                sock.settimeout(None)
            except OSError as e:
                sock.close()
                reason = e.strerror or type(e).__name__
                if time.monotonic() + 0.05 >= deadline:
                    raise JobServiceUnavailable(
                        f"the job service at {self.endpoint} could not be reached within "
                        f"{self.timeout:g} s ({reason})"
                    ) from None
                time.sleep(0.05)
                continue
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conversation = _Conversation(sock, self.endpoint)
            if self.secret is not None:
                try:
                    nonce = conversation.ask(
                        wire.Challenge,
                        wire.Challenge.makeArguments({}, None),
                        self.timeout,
                        "login",
                    )["nonce"]
                    digest = wire.digest(self.secret, nonce)
                    conversation.ask(
                        wire.Login,
                        wire.Login.makeArguments({"digest": digest}, None),
                        self.timeout,
                        "login",
                    )
                except AuthenticationFailed as e:
                    conversation.close("login refused")
                    raise AuthenticationFailed(
                        f"the job service at {self.endpoint} refused the shared secret ({e})"
                    ) from None
                except BaseException:
                    conversation.close("login failed")
                    raise
            return conversation


class _NotSent(Exception):
    """The connection broke before the request was written."""


class _Waiter:
    __slots__ = ("event", "box", "broken")

    def __init__(self):
        self.event = threading.Event()
        self.box: dict | None = None
        self.broken: str | None = None


class _Conversation:
    """One blocking AMP connection: requests tagged, answers read by a thread of its own."""

    def __init__(self, sock: socket.socket, endpoint: str):
        from twistedlrp.jobs.child import BoxReader

        self.sock = sock
        self.endpoint = endpoint
        self.reader = BoxReader()
        self.asks = 0
        self.pid = os.getpid()
        self.broken: str | None = None
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Waiter] = {}
        threading.Thread(target=self._read, name="twistedlrp-job-client", daemon=True).start()

    def usable(self) -> bool:
        # A copy in a forked process has no reader: the connection is its parent's.
        return self.broken is None and self.pid == os.getpid()

    def close(self, reason: str) -> None:
        """Fail every waiting request with C{reason} and close the socket."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = reason
            waiting, self._pending = list(self._pending.values()), {}
        for waiter in waiting:
            waiter.broken = reason
            waiter.event.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _read(self) -> None:
        reason = "the service closed the connection"
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                for box in self.reader.feed(data):
                    tag = box.get(b"_answer") or box.get(b"_error")
                    with self._lock:
                        waiter = self._pending.pop(tag, None)
                    if waiter is not None:
                        waiter.box = box
                        waiter.event.set()
        except OSError as e:
            reason = e.strerror or str(e)
        self.close(reason)

    def ask(self, command, box, timeout: float, op: str) -> dict:
        """
        @return: the parsed answer.
        @raise _NotSent: the connection had broken before the request was written.
        """
        waiter = _Waiter()
        with self._lock:
            if self.broken is not None:
                raise _NotSent(self.broken)
            self.asks += 1
            tag = b"%d" % self.asks
            box[b"_command"] = command.commandName
            box[b"_ask"] = tag
            self._pending[tag] = waiter
            try:
                # Under the lock: one request's bytes never mix with another's.
                self.sock.sendall(box.serialize())
                sent = None
            except OSError as e:
                self._pending.pop(tag, None)
                sent = e.strerror or str(e)
        if sent is not None:
            self.close(sent)
            raise JobServiceUnavailable(
                f"the connection to the job service at {self.endpoint} broke during {op}: "
                f"{sent}" + _UNKNOWN_OUTCOME.get(op, "")
            )
        if not waiter.event.wait(timeout):
            with self._lock:
                self._pending.pop(tag, None)
            raise JobServiceUnavailable(
                f"the job service at {self.endpoint} did not answer {op} within "
                f"{timeout:g} s" + _UNKNOWN_OUTCOME.get(op, "")
            )
        if waiter.box is None:
            raise JobServiceUnavailable(
                f"the connection to the job service at {self.endpoint} broke during {op}: "
                f"{waiter.broken}" + _UNKNOWN_OUTCOME.get(op, "")
            )
        if b"_error" in waiter.box:
            self._raise(command, waiter.box, op)
        return command.parseResponse(waiter.box, None)

    def _raise(self, command, answer: dict, op: str):
        code = answer.get(b"_error_code", b"")
        description = answer.get(b"_error_description", b"").decode("utf-8", "replace")
        error_class = command.reverseErrors.get(code)
        if error_class is None:
            raise JobServiceUnavailable(
                f"the connection to the job service at {self.endpoint} broke during {op}: "
                f"{description}" + _UNKNOWN_OUTCOME.get(op, "")
            )
        if code in command.fatalErrors.values():
            self.close(description)  # the service closes it too
        raise error_class(description)


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


def _split_endpoint(endpoint: str) -> list[str]:
    """@return: the parts of an endpoint string between unescaped colons, unescaped."""
    parts, current, escaped = [], "", False
    for char in endpoint:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _unix_path(endpoint: str) -> str | None:
    """@return: the socket path of a C{unix:} client endpoint string, else C{None}."""
    parts = _split_endpoint(endpoint)
    if parts[0] != "unix" or len(parts) < 2:
        return None
    for part in parts[1:]:
        if part.startswith("path="):
            return part[len("path=") :]
    return parts[1] if "=" not in parts[1] else None
