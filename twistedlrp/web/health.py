"""
The health endpoint, answered by the reactor without taking a pool thread.

It returns JSON and the status code a load balancer acts on: 200 while the
server runs, 503 while it starts or stops, and 503 with C{"status":
"degraded"} while a part it needs cannot work (a section, such as the job
service's, reports C{"healthy": false} and says why).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable


class HealthResource:
    """
    @param server_state: returns C{"starting"}, C{"running"} or C{"stopping"}.
    @param pool: the WSGI thread pool, whose counts are reported.
    @param started_at: the reactor time the process started at.
    """

    def __init__(self, reactor, server_state: Callable[[], str], pool, started_at: float):
        self._reactor = reactor
        self._server_state = server_state
        self._pool = pool
        self._started_at = started_at
        # name -> callable returning a JSON-able dict (or None: no section),
        # for other components (the job service adds its counts here).
        self.sections: dict[str, Callable[[], dict]] = {}
        # The threads that may stream (web/limits.py StreamSlots), if any.
        self.streams = None
        # Returns the threads in a job call (jobs/client/calls.py CallSlots), if limited.
        self.job_calls: Callable[[], dict | None] | None = None

    def render(self, request):
        state = self._server_state()
        body = {
            "status": state,
            "pid": os.getpid(),
            "uptime": round(self._reactor.seconds() - self._started_at, 3),
        }
        if self._pool is not None:
            stats = self._pool.stats()
            body["threads"] = {"busy": stats["busy"], "idle": stats["idle"], "size": stats["size"]}
            if self.streams is not None:
                body["threads"]["streaming"] = self.streams.taken
            job_calls = self.job_calls() if self.job_calls is not None else None
            if job_calls is not None:
                body["threads"]["job_calls"] = job_calls
            body["waiting"] = stats["waiting"]
        healthy = True
        for name, section in self.sections.items():
            try:
                value = section()
            except Exception as e:
                value = {"healthy": False, "error": str(e)}
            if value is None:
                continue  # Nothing to report (yet).
            body[name] = value
            healthy = healthy and body[name].get("healthy", True)
        if state == "running" and not healthy:
            # Serving, but a part it needs cannot work: a load balancer should look elsewhere.
            body["status"] = "degraded"
        request.setResponseCode(200 if state == "running" and healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"
