"""
The health endpoint, answered by the reactor: JSON, 200 while the server runs,
503 while it starts, stops, or is C{"degraded"} (a section says C{"healthy": false}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable


class HealthResource:
    """The health endpoint; C{server_state()} is C{"starting"}, C{"running"} or C{"stopping"}."""

    def __init__(self, reactor, server_state: Callable[[], str], pool, started_at: float):
        self._reactor = reactor
        self._server_state = server_state
        self._pool = pool
        self._started_at = started_at
        # name -> callable returning a JSON-able dict (or None: no section).
        self.sections: dict[str, Callable[[], dict]] = {}
        self.streams = None  # StreamSlots, if any
        # Returns the threads in a job call (CallSlots), if limited.
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
            body["threads"] = {key: stats[key] for key in ("busy", "idle", "size")}
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
            if value is not None:
                body[name] = value
                healthy = healthy and value.get("healthy", True)
        if state == "running" and not healthy:
            body["status"] = "degraded"
        request.setResponseCode(200 if state == "running" and healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"
