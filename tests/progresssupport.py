"""
Helpers of the job progress widget's tests (tests/test_progress.py,
tests/test_progress_script.py): a gated job the test steps, the page that
shows it and what its widget was given, a Server-Sent Events client on a raw
HTTP connection, tokens made as the test site would make them, and the
server both modules share the shape of (L{progress_server}).
"""

from __future__ import annotations

import html
import http.client
import json
import re
import time
import uuid
from pathlib import Path
from unittest import mock

from jobsupport import api, make_template_db, start_server

from support import request

SALT = "twistedlrp.progress"  # twistedlrp.progress.SALT
SECRET_KEY = "tests-only"  # the test site's


def progress_server(tmp_path_factory):
    """
    A module's server (one worker) for the progress tests: yields
    C{(server, template, base)} and kills the server afterwards.
    """
    base = tmp_path_factory.mktemp("progress")
    template = make_template_db(base)
    server = start_server(template, base / "server", "--workers", "1")
    yield server, template, base
    server.kill()


class Job:
    """A gated_steps job: C{step()} lets it report its next step."""

    def __init__(self, server, base: Path, count: int = 3):
        self.markers = base / uuid.uuid4().hex
        self.markers.mkdir()
        self.count = count
        self.done = 0
        info = api(
            server, "submit", name="testapp.jobs.gated_steps", args=[str(self.markers), count]
        )
        self.id = info["job"]["id"]

    def step(self) -> None:
        self.done += 1
        (self.markers / f"go-{self.done}").touch()

    def finish(self) -> None:
        while self.done < self.count:
            self.step()


class Page:
    """The test site's page of a job, and what its widget was given."""

    def __init__(self, server, job_id: str, query: str = ""):
        response = request(server.port, f"/progress/{job_id}{query}")
        assert response.status == 200, response.text
        self.text = response.text
        self.job_id = job_id
        self.state = re.search(r'data-state="([^"]*)"', self.text).group(1)

        def attribute(name):
            found = re.search(rf'{name}="([^"]*)"', self.text)
            assert found, (name, self.text)
            return html.unescape(found.group(1))

        self.events_url = attribute("data-events")
        self.status_url = attribute("data-status")
        self.cancel_url = re.search(
            r'class="lrp-job-cancel" method="post" action="([^"]+)"', self.text
        ).group(1)
        self.token = attribute('name="token" value')


class EventStream:
    """An SSE client on a raw HTTP connection: reads events as they arrive."""

    def __init__(self, port: int, path: str, timeout: float = 10):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}
        self.fields: list[dict] = []

    def next_block(self) -> dict | None:
        """@return: the next block of lines up to a blank one (C{None} at the end)."""
        block: dict = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if not line:
                if block:
                    return block
                continue
            name, _, value = line.partition(":")
            block.setdefault(name, []).append(value.removeprefix(" "))

    def next_event(self) -> tuple[str, dict]:
        """@return: the next event's name and data, skipping comments and retry."""
        while True:
            block = self.next_block()
            assert block is not None, "the stream ended"
            if "event" in block:
                return block["event"][0], json.loads("\n".join(block["data"]))

    def until(self, predicate) -> dict:
        """@return: the data of the first progress event that satisfies C{predicate}."""
        while True:
            name, data = self.next_event()
            assert name == "progress", (name, data)
            if predicate(data):
                return data

    def close(self) -> None:
        self.conn.close()


def forged_token(job_id: str, user=None, age: float = 0) -> str:
    """@return: a token as the site would have made it C{age} seconds ago."""
    from django.core import signing

    with mock.patch("django.core.signing.time.time", return_value=time.time() - age):
        signer = signing.TimestampSigner(key=SECRET_KEY, salt=SALT, fallback_keys=[])
        return signer.sign_object({"j": job_id, "u": user})


def streams_open(server) -> int:
    return request(server.port, "/-/health").json()["progress_streams"]["open"]
