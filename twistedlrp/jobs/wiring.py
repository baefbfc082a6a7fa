"""The job parts of a server: the job service with its front ends, and the job client."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.application import service

from twistedlrp.jobs import registry
from twistedlrp.jobs.client import calls as jobs_client

if TYPE_CHECKING:
    from twistedlrp.jobs.client.connection import JobClient, LocalClient


def job_services(reactor, options) -> tuple[service.IService | None, service.IService]:
    """
    @return: C{(job service, or None with --no-jobs or --jobs-connect; job client service)}.
    @raise twistedlrp.boot.BootError: no C{twistedlrp} app, or a job module fails to import.
    """
    from django.apps import apps
    from django.conf import settings

    from twistedlrp.boot import BootError
    from twistedlrp.jobs.protocol.amp import AMPFrontEnd
    from twistedlrp.jobs.service.job_service import DEFAULT_CANCEL_GRACE, JobService

    run_service = not options["no-jobs"] and not options["jobs-connect"]
    if run_service and not apps.is_installed("twistedlrp"):
        raise BootError(
            "the job service needs the app 'twistedlrp' in INSTALLED_APPS (its Job model is "
            "the job store): add it and run 'python manage.py migrate', or start with --no-jobs"
        )
    registry.discover()
    if not run_service:
        return None, JobClientService(reactor, options, None)
    open_permissions = bool(options.get("allow-open-permissions"))
    front_ends = [
        AMPFrontEnd(
            reactor, options["jobs-listen"], options["state-dir"], options["jobs-secret-file"],
            open_permissions,
        )
    ]  # fmt: skip
    if options["pb-listen"]:
        # Only then: twisted.spread is not imported otherwise.
        from twistedlrp.jobs.pb import PBFrontEnd

        front_ends.append(PBFrontEnd(reactor, options["pb-listen"], options["jobs-secret-file"]))
    grace = float(getattr(settings, "LRP_JOBS_CANCEL_GRACE", DEFAULT_CANCEL_GRACE))
    jobs = JobService(reactor, options, front_ends, cancel_grace=grace)
    return jobs, JobClientService(reactor, options, jobs)


class JobClientService(service.Service):
    """
    The process's job client: to this server's job service, the nodes of
    C{--jobs-connect}, or the settings', with at most C{call_threads} threads in a call.
    """

    name = "job-client"

    def __init__(self, reactor, options, local):
        self.reactor, self.options, self.local = reactor, options, local
        self.client: JobClient | LocalClient | None = None
        self.call_threads: int | None = None

    def startService(self) -> None:
        from twistedlrp.jobs.client.connection import JobClient, LocalClient

        super().startService()
        options, reactor = self.options, self.reactor
        if self.local is not None and not options["jobs-connect"]:
            # This process's own service: called directly, without AMP or a socket.
            description = options["jobs-listen"] or jobs_client.unix_client_endpoint(
                os.path.join(options["state-dir"], "jobs.sock")
            )
            self.client = LocalClient(reactor, self.local, jobs_client.jobs_timeout(), description)
        else:
            endpoints = list(options["jobs-connect"]) or jobs_client.configured_endpoints(
                options["state-dir"]
            )
            login = jobs_client.configured_login(options["jobs-secret-file"])
            self.client = JobClient(reactor, endpoints, *login)
            self.client.start()
        jobs_client.install(self.client, self.call_threads)

    def describe(self) -> dict | None:
        """@return: the health endpoint's C{job_link} section (C{None}: an in-process client)."""
        if not hasattr(self.client, "describe"):
            return None
        body = self.client.describe(requires=bool(self.options["health-requires-jobs"]))
        slots = jobs_client.call_slots()
        if slots is not None:
            body["calls"] = slots.describe()
        return body

    def stopService(self):
        super().stopService()
        client, self.client = self.client, None
        if client is not None:
            jobs_client.install(None)
            return client.stop()
        return None
