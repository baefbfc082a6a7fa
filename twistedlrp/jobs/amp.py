"""
The job service's AMP front end: one L{ServiceProtocol} per client
connection, and L{AMPFrontEnd}, which listens.

By default the service listens on a UNIX socket of mode 0600 in the state
directory, trusted without a login. Any other listener requires the shared
secret: nothing but C{Challenge} and C{Login} is answered before a
successful Login (see L{twistedlrp.jobs.wire}).
"""

from __future__ import annotations

import hmac
import os
import socket
import stat

from twisted.internet import defer, protocol
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols import amp

from twistedlrp.jobs import wire
from twistedlrp.jobs.client import unix_client_endpoint
from twistedlrp.jobs.errors import AuthenticationFailed, JobError
from twistedlrp.services import StartupFailed

log = Logger()


class ServiceProtocol(wire.QuietAMP):
    """
    One client connection. With C{secret} set, nothing but C{Challenge}
    and C{Login} is answered before a successful Login; anything else, or
    a wrong digest, gets an error and the connection is closed.
    """

    def __init__(self, service, secret: bytes | None):
        super().__init__()
        self.service = service
        self.secret = secret
        self.authenticated = secret is None
        self.nonce: bytes | None = None

    def locateResponder(self, name):
        responder = super().locateResponder(name)
        if self.authenticated or name in (b"Challenge", b"Login"):
            return responder

        def refuse(box):
            log.warn(
                "Job client {peer} sent {command} before logging in: disconnected",
                peer=self.transport.getPeer(),
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
        self.nonce = wire.new_nonce()
        return {"nonce": self.nonce}

    @wire.Login.responder
    def login(self, digest):
        if self.secret is None:
            return {"ok": True}
        nonce, self.nonce = self.nonce, None
        if nonce is None or not hmac.compare_digest(digest, wire.digest(self.secret, nonce)):
            log.warn(
                "Job client {peer} failed to log in (wrong secret): disconnected",
                peer=self.transport.getPeer(),
            )
            raise AuthenticationFailed("login refused: wrong secret (or no Challenge first)")
        self.authenticated = True
        return {"ok": True}

    @wire.Submit.responder
    def submit(self, name, payload, priority=None, run_after=None, key=None, timeout=None):
        d = _guard(self.service.submit, name, payload, priority, run_after, key, timeout)
        return d.addCallback(lambda job: {"job": job})

    @wire.Status.responder
    def status(self, job_id):
        return _guard(self.service.status, job_id).addCallback(lambda job: {"job": job})

    @wire.Cancel.responder
    def cancel(self, job_id):
        return _guard(self.service.cancel, job_id).addCallback(lambda job: {"job": job})

    @wire.Wait.responder
    def wait(self, job_id, timeout):
        return _guard(self.service.wait, job_id, timeout).addCallback(lambda job: {"job": job})

    @wire.ListJobs.responder
    def list_jobs(self, limit, state=None, name=None):
        return _guard(self.service.list_jobs, state, name, limit).addCallback(
            lambda jobs: {"jobs": jobs}
        )

    @wire.Stats.responder
    def stats(self):
        return _guard(self.service.stats).addCallback(lambda stats: {"stats": stats})


def _guard(fn, *args) -> defer.Deferred:
    """
    Call a service operation; an unexpected error is logged and sent as a
    L{JobError} (an error AMP does not know would close the connection).
    """

    def translate(failure):
        if failure.check(JobError):
            return failure
        log.failure("Job service operation {op} failed", failure, op=fn.__name__)
        raise JobError(f"internal error in the job service: {failure.getErrorMessage()}")

    return defer.maybeDeferred(fn, *args).addErrback(translate)


class ServiceFactory(protocol.Factory):
    """Builds a L{ServiceProtocol} per connection; C{secret} C{None} means trusted (UNIX socket)."""

    noisy = False

    def __init__(self, service, secret: bytes | None):
        self.service = service
        self.secret = secret

    def buildProtocol(self, addr):
        return ServiceProtocol(self.service, self.secret)


class AMPFrontEnd:
    """
    Listens for job clients over AMP.

    @param endpoint: a server endpoint string, or C{None} for the UNIX
        socket C{jobs.sock} in C{state_dir} (mode 0600, no login).
    @param secret_file: the shared secret's file, required for any other endpoint.
    @ivar client_endpoint: once listening, the client endpoint string that
        reaches it (for the workers and the local job client).
    """

    def __init__(self, reactor, endpoint: str | None, state_dir: str, secret_file: str | None):
        self.reactor = reactor
        self.endpoint = endpoint
        self.state_dir = state_dir
        self.secret_file = secret_file
        self.client_endpoint: str | None = None
        self.port = None

    async def listen(self, service) -> None:
        """@raise StartupFailed: the endpoint cannot listen, or another service owns the socket."""
        endpoint = self.endpoint
        if endpoint is None:
            path = self._prepare_socket_path()
            endpoint = "unix:" + path.replace(":", "\\:") + ":mode=600:lockfile=0"
        secret = None
        if not endpoint.startswith("unix:"):
            secret = wire.read_secret(self.secret_file)
        try:
            self.port = await serverFromString(self.reactor, endpoint).listen(
                ServiceFactory(service, secret)
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

    def stop(self) -> defer.Deferred:
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    def _prepare_socket_path(self) -> str:
        state_dir = os.path.abspath(self.state_dir)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(state_dir, "jobs.sock")
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1)
                probe.connect(path)
            except OSError:
                # Left by a server that died: nobody answers there.
                os.unlink(path)
            else:
                raise StartupFailed(
                    f"another job service already listens on {path} (is another server "
                    f"running with --state-dir {state_dir}?)"
                )
            finally:
                probe.close()
        return path
