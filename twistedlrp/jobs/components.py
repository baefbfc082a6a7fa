"""
The job service and the job client as parts of the server
(L{twistedlrp.server.Component}), added by L{add_job_components}.
"""

from __future__ import annotations

import os
import socket
import stat

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from twistedlrp.server import Component

log = Logger()


def add_job_components(server, options) -> None:
    """
    Add the job service (unless C{--no-jobs} or C{--jobs-connect}) and the
    job client to C{server}.

    @raise twistedlrp.boot.BootError: the service is wanted but the
        C{twistedlrp} app is not installed, or a job module fails to import.
    """
    from django.apps import apps

    from twistedlrp.boot import BootError
    from twistedlrp.jobs import registry

    run_service = not options["no-jobs"] and not options["jobs-connect"]
    if run_service and not apps.is_installed("twistedlrp"):
        raise BootError(
            "the job service needs the app 'twistedlrp' in INSTALLED_APPS (its Job model is "
            "the job store): add it and run 'python manage.py migrate', or start with --no-jobs"
        )
    registry.discover()
    service = None
    if run_service:
        service = JobServiceComponent(server, options)
        server.components.append(service)
    server.components.append(JobClientComponent(server, options, service))


class JobServiceComponent(Component):
    name = "jobs"

    def __init__(self, server, options):
        from django.conf import settings

        from twistedlrp.jobs.service import JobService

        self.server = server
        self.options = options
        self.reactor = server.reactor
        self.ports = []
        self.client_endpoint: str | None = None
        self.service = JobService(
            server.reactor,
            options,
            cancel_grace=float(getattr(settings, "LRP_JOBS_CANCEL_GRACE", 5.0)),
        )

    async def start(self) -> None:
        from twistedlrp.jobs import protocol as wire
        from twistedlrp.jobs.client import unix_client_endpoint
        from twistedlrp.jobs.service import ServiceFactory
        from twistedlrp.server import StartupFailed

        options = self.options
        endpoint = options["jobs-listen"]
        if endpoint is None:
            path = self._prepare_socket_path()
            endpoint = "unix:" + path.replace(":", "\\:") + ":mode=600:lockfile=0"
        secret = None
        if not endpoint.startswith("unix:"):
            secret = wire.read_secret(options["jobs-secret-file"])
        # The workers' jobs may submit jobs too: point them at this service.
        await self.service.start()
        try:
            port = await serverFromString(self.reactor, endpoint).listen(
                ServiceFactory(self.service, secret)
            )
        except Exception as e:
            raise StartupFailed(f"the job service cannot listen on {endpoint}: {e}") from e
        self.ports.append(port)
        host = port.getHost()
        if hasattr(host, "port"):
            address = "127.0.0.1" if host.host in ("0.0.0.0", "::") else host.host
            self.client_endpoint = f"tcp:host={address}:port={host.port}"
            log.info("Job service listening on {endpoint} (login required)", endpoint=endpoint)
        else:
            path = host.name.decode() if isinstance(host.name, bytes) else host.name
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
            self.client_endpoint = unix_client_endpoint(path)
            log.info("Job service listening on unix:{path} (mode 0600)", path=path)
        if options["pb-listen"]:
            await self._listen_pb(options["pb-listen"])
        self.service.pool.env["LRP_JOBS_CONNECT"] = self.client_endpoint
        if options["jobs-secret-file"]:
            self.service.pool.env["LRP_JOBS_SECRET_FILE"] = options["jobs-secret-file"]

    async def _listen_pb(self, endpoint: str) -> None:
        from twistedlrp.jobs import protocol as wire
        from twistedlrp.jobs.pb import listen_pb
        from twistedlrp.server import StartupFailed

        if not self.options["jobs-secret-file"]:
            raise StartupFailed(
                f"--pb-listen {endpoint}: the Perspective Broker front end always requires a "
                "login: give --jobs-secret-file"
            )
        secret = wire.read_secret(self.options["jobs-secret-file"])
        try:
            self.ports.append(await listen_pb(self.reactor, self.service, endpoint, secret))
        except Exception as e:
            raise StartupFailed(f"the job service cannot listen on {endpoint}: {e}") from e

    def _prepare_socket_path(self) -> str:
        from twistedlrp.server import StartupFailed

        state_dir = os.path.abspath(self.options["state-dir"])
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

    async def stop(self, deadline: float) -> None:
        for port in self.ports:
            try:
                await port.stopListening()
            except Exception:
                log.failure("Closing the job service's port")
        self.ports = []
        await self.service.stop(deadline)

    def health(self) -> dict | None:
        return self.service.health()

    def force_exit(self) -> None:
        self.service.force_exit()


class JobClientComponent(Component):
    name = "job-client"

    def __init__(self, server, options, service: JobServiceComponent | None):
        self.server = server
        self.options = options
        self.service = service
        self.client = None

    async def start(self) -> None:
        from django.conf import settings

        from twistedlrp.jobs import client as jobs_client
        from twistedlrp.jobs import protocol as wire

        options = self.options
        if options["jobs-connect"]:
            endpoint = options["jobs-connect"]
        elif self.service is not None:
            endpoint = self.service.client_endpoint
        else:
            endpoint = getattr(
                settings, "LRP_JOBS_CONNECT", None
            ) or jobs_client.unix_client_endpoint(os.path.join(options["state-dir"], "jobs.sock"))
        secret_file = options["jobs-secret-file"] or getattr(settings, "LRP_JOBS_SECRET_FILE", None)
        secret = wire.read_secret(secret_file) if secret_file else None
        if endpoint.startswith("unix:"):
            secret = None
        timeout = float(getattr(settings, "LRP_JOBS_TIMEOUT", jobs_client.DEFAULT_TIMEOUT))
        self.client = jobs_client.JobClient(self.server.reactor, endpoint, secret, timeout)
        self.client.start()
        jobs_client.install(self.client)

    async def stop(self, deadline: float) -> None:
        from twistedlrp.jobs import client as jobs_client

        if self.client is not None:
            jobs_client.install(None)
            await self.client.stop()
