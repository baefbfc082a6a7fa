"""The job service's AMP front end (docs/protocol.md): L{AMPFrontEnd} and its L{ServiceProtocol}."""

from __future__ import annotations

import functools
import hmac
import os
import socket
import stat
from dataclasses import dataclass

from twisted.internet import defer, protocol
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols import amp

from twistedlrp.jobs.client.calls import unix_client_endpoint
from twistedlrp.jobs.errors import AuthenticationFailed, PayloadTooLarge
from twistedlrp.jobs.protocol import limits, wire
from twistedlrp.jobs.protocol.arguments import default_max_payload
from twistedlrp.jobs.protocol.framing import BoxReader, BoxTooLarge
from twistedlrp.ordered_service import StartupFailed, cancel_call
from twistedlrp.values import permissions_problem

log = Logger()


def _answering(operation: wire.Operation):
    """@return: the AMP responder of C{operation}: the service's method (L{limits.guarded})."""

    def respond(self, **arguments):
        d = limits.guarded(log, operation.name, operation.call, self.service, arguments)
        return d.addCallback(lambda answer: {operation.answer: answer})

    respond.__name__ = operation.name
    return respond


class ServiceProtocol(limits.Guarded, wire.QuietAMP):
    """
    One client connection. With C{secret} set, anything but C{Challenge} and
    C{Login} before a successful Login, or a wrong digest, closes it. Without
    a C{gate}: no login deadline and unthrottled warnings.
    """

    def __init__(self, service, secret: bytes | None, gate: limits.Gate | None = None):
        super().__init__()
        self.service = service
        self.secret = secret
        self.authenticated = secret is None
        self.nonce: bytes | None = None
        self.gate = gate
        self.max_payload = getattr(service, "max_payload", None) or default_max_payload()
        self.max_box = self.max_payload + limits.BOX_FRAMING
        self.reader = BoxReader(amp.AmpBox)
        self._discarding = False  # the rest of a refused box is being dropped
        self._discard_deadline = None  # an IDelayedCall

    def connectionLost(self, reason):
        cancel_call(self._discard_deadline)
        super().connectionLost(reason)

    def dataReceived(self, data):
        reader = self.reader
        if self._refused:
            return
        reader.add(data)
        while not self._refused and self.transport is not None:
            try:
                if self._discarding:
                    if reader.next_box(keep=False) is not None:
                        self._close()  # the end of the refused box
                    return
                # Before Login, the limit is of all boxes together.
                before = limits.PRE_LOGIN_BYTES - (reader.consumed - reader.size)
                box = reader.next_box(self.max_box if self.authenticated else before)
            except BoxTooLarge:
                self._too_large()
                continue
            except ValueError:
                # A key longer than AMP allows: not AMP.
                self._close()
                return
            if box is None:
                return
            self.ampBoxReceived(box)

    def _too_large(self) -> None:
        box = self.reader.box
        ask = box.get(b"_ask")
        command = box.get(b"_command", b"?").decode("ascii", "replace")
        if not self.authenticated:
            self.warn_pre_login_size()
            self._answer_error(
                ask,
                wire.FATAL_ERRORS[AuthenticationFailed],
                f"this job service requires Login (challenge-response with the shared secret) "
                f"first, and takes at most {limits.PRE_LOGIN_BYTES} bytes before it",
            )
            self._close()
            return
        self.warn(
            "box-size",
            "sent a {command} of more than {limit} bytes (--max-job-payload "
            "{payload} plus framing): refused, disconnected",
            command=command,
            limit=self.max_box,
            payload=self.max_payload,
        )
        self._answer_error(
            ask,
            wire.ERRORS[PayloadTooLarge],
            f"the {command} is larger than the job service takes in one message "
            f"({self.max_box} bytes: its limit of {self.max_payload} bytes "
            f"(--max-job-payload) plus framing); the connection is closed",
        )
        # Drop the rest of the box as it comes, so that the client reads the answer; then close.
        self.reader.box.clear()
        self._discarding = True
        if self.gate is not None:
            self._discard_deadline = self.gate.clock.callLater(limits.DISCARD_TIMEOUT, self._close)

    def _answer_error(self, ask: bytes | None, code: bytes, description: str) -> None:
        if ask is None or self.transport is None:
            return
        self.sendBox(
            amp.AmpBox(_error=ask, _error_code=code, _error_description=description.encode())
        )

    def _close(self) -> None:
        cancel_call(self._discard_deadline)
        super()._close()

    def ampBoxReceived(self, box):
        if amp.COMMAND not in box:
            # An answer, an error or nothing: this service asks its clients nothing.
            self.warn("not-a-command", "sent a box that is not a command: disconnected")
            self._close()
            return
        super().ampBoxReceived(box)

    def unhandledError(self, failure):
        """A command sent without C{_ask} failed: our refusals pass quietly, not AMP's traceback."""
        if failure.check(amp.RemoteAmpError):
            if failure.value.fatal:
                self._close()
            return
        limits.internal_errors.failure(
            log,
            failure,
            "Job client {peer}: {op} failed unexpectedly; the connection is closed",
            op="connection",
            peer=limits.describe_peer(self.peer),
        )
        self._close()

    def locateResponder(self, name):
        if self.authenticated or name in (b"Challenge", b"Login"):
            return super().locateResponder(name)

        def refuse(box):
            self.warn(
                "before-login",
                "sent {command} before logging in: disconnected",
                command=name.decode("ascii", "replace"),
            )
            return defer.fail(
                amp.RemoteAmpError(
                    wire.FATAL_ERRORS[AuthenticationFailed],
                    "this job service requires Login (challenge-response with the shared "
                    "secret) before any other command",
                    fatal=True,
                )
            )

        return refuse

    @wire.Challenge.responder
    def challenge(self):
        self.nonce = os.urandom(32)
        return {"nonce": self.nonce}

    @wire.Login.responder
    def login(self, digest):
        if self.secret is None:
            return {"ok": True}
        nonce, self.nonce = self.nonce, None
        if nonce is None or not hmac.compare_digest(digest, wire.digest(self.secret, nonce)):
            self.warn_wrong_secret()
            raise AuthenticationFailed("login refused: wrong secret (or no Challenge first)")
        self.logged_in()
        return {"ok": True}

    for _op in wire.OPERATIONS.values():
        locals()[_op.name] = _op.command.responder(_answering(_op))
    del _op


class ServiceFactory(protocol.Factory):
    """Builds a L{ServiceProtocol} per connection; C{secret} C{None} means trusted."""

    noisy = False

    def __init__(self, service, secret: bytes | None, gate: limits.Gate | None = None):
        self.protocol = functools.partial(ServiceProtocol, service, secret, gate)


@dataclass(eq=False)
class AMPFrontEnd(limits.FrontEnd):
    """Listens for job clients over AMP (logging in with C{secret_file} but on a UNIX socket)."""

    reactor: object
    # None: the UNIX socket jobs.sock in state_dir (mode 0600, trusted without a login).
    endpoint: str | None
    state_dir: str
    secret_file: str | None
    allow_open_permissions: bool = False

    async def listen(self, service) -> None:
        """Serve C{service}. @raise StartupFailed: it cannot listen, or the socket is not ours."""
        endpoint = self.endpoint
        if endpoint is None:
            path = self._prepare_socket_path(self.allow_open_permissions)
            endpoint = "unix:" + path.replace(":", "\\:") + ":mode=600:lockfile=0"
        secret = None if endpoint.startswith("unix:") else wire.read_secret(self.secret_file)
        gate = limits.Gate(self.reactor, endpoint, limits.configured_limits(), log)
        try:
            self.port = await serverFromString(self.reactor, limits.with_backlog(endpoint)).listen(
                ServiceFactory(service, secret, gate)
            )
        except Exception as e:
            raise StartupFailed(f"the job service cannot listen on {endpoint}: {e}") from e
        host = self.port.getHost()
        if hasattr(host, "port"):
            address = "127.0.0.1" if host.host in ("0.0.0.0", "::") else host.host
            self.client_endpoint = f"tcp:host={address}:port={host.port}"
            log.info("Job service listening on {endpoint} (login required)", endpoint=endpoint)
        else:
            path = host.name.decode() if isinstance(host.name, bytes) else host.name
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
            self.client_endpoint = unix_client_endpoint(path)
            log.info("Job service listening on unix:{path} (mode 0600)", path=path)

    def _prepare_socket_path(self, allow_open_permissions: bool = False) -> str:
        """
        @return: the socket's path in the state directory (made 0700), a dead server's removed.
        @raise StartupFailed: another service listens there, or others may write to it.
        """
        state_dir = os.path.abspath(self.state_dir)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        problem = permissions_problem(os.stat(state_dir).st_mode, stat.S_IWGRP | stat.S_IWOTH)
        if problem and not allow_open_permissions:
            raise StartupFailed(
                f"--state-dir {state_dir} is {problem}: chmod 700 it, or pass "
                f"--allow-open-permissions"
            )
        path = os.path.join(state_dir, "jobs.sock")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1)
                try:
                    probe.connect(path)
                except OSError:
                    # Left by a server that died: nobody answers there.
                    os.unlink(path)
                else:
                    raise StartupFailed(
                        f"another job service already listens on {path} (is another server "
                        f"running with --state-dir {state_dir}?)"
                    )
        return path
