"""
The job client without a reactor: outside the server (a script, a worker's
job, another WSGI server) a C{unix:} or C{tcp:} endpoint is reached over
the process's one AMP connection, written by the calling thread itself and
read by a reader thread that hands each caller its answer
(L{BlockingClient}): one thread hop instead of the two to a reactor thread
and back. L{twistedlrp.jobs.client.call} uses it when it can.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from twistedlrp.jobs import wire
from twistedlrp.jobs.client import (
    COMMANDS,
    DEFAULT_TIMEOUT,
    UNKNOWN_OUTCOME,
    configured,
    configured_endpoint,
    no_answer,
    split_endpoint,
)
from twistedlrp.jobs.errors import (
    AuthenticationFailed,
    JobServiceUnavailable,
)

_lock = threading.Lock()

_blocking: BlockingClient | None = None
_NO_BLOCKING = object()


def blocking_client() -> BlockingClient | None:
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
    parts = split_endpoint(endpoint)
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
        command, answer_key, arguments = COMMANDS[op](kw)
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
        from twistedlrp.jobs.framing import BoxReader

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
                f"{sent}" + UNKNOWN_OUTCOME.get(op, "")
            )
        if not waiter.event.wait(timeout):
            with self._lock:
                self._pending.pop(tag, None)
            raise no_answer(self.endpoint, op, timeout)
        if waiter.box is None:
            raise JobServiceUnavailable(
                f"the connection to the job service at {self.endpoint} broke during {op}: "
                f"{waiter.broken}" + UNKNOWN_OUTCOME.get(op, "")
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
                f"{description}" + UNKNOWN_OUTCOME.get(op, "")
            )
        if code in command.fatalErrors.values():
            self.close(description)  # the service closes it too
        raise error_class(description)
