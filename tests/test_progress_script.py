"""
The job progress widget's script, twistedlrp/static/twistedlrp/progress.js,
run by Node against a real server (tests/programs/progress_widget.mjs gives
it a DOM of one widget and an EventSource made of fetch): over the event
stream, by polling, and by polling after a refused stream. And the stream
served by a web process of --web-workers over its AMP job client.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from jobsupport import start_server
from progresssupport import EventStream, Job, Page, progress_server

from support import ROOT


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from progress_server(tmp_path_factory)


class Widget:
    """progress.js run by Node (tests/programs/progress_widget.mjs) on a page's widget."""

    def __init__(self, server, page: Page, *flags: str, events_url: str | None = None):
        attributes = {
            "lrpJob": page.job_id,
            "state": page.state,
            "events": events_url or page.events_url,
            "status": page.status_url,
        }
        self.proc = subprocess.Popen(
            [NODE, str(PROGRAMS / "progress_widget.mjs"), str(SCRIPT), server.url("/"),
             json.dumps(attributes), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next(self, timeout: float = 15) -> dict:
        """@return: the next line the program printed, as JSON."""
        line = self.lines.get(timeout=timeout)
        assert line is not None, "node exited"
        try:
            return json.loads(line)
        except ValueError:
            raise AssertionError(f"node said: {line}") from None

    def update(self, predicate=lambda job: True) -> dict:
        """@return: the next "lrp:job" update whose job satisfies C{predicate}."""
        while True:
            line = self.next()
            if "event" in line and predicate(line["event"]):
                return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


NODE = shutil.which("node")
PROGRAMS = Path(__file__).parent / "programs"
SCRIPT = ROOT / "twistedlrp" / "static" / "twistedlrp" / "progress.js"
needs_node = pytest.mark.skipif(NODE is None, reason="no node to run progress.js in")


@needs_node
@pytest.mark.parametrize("how", ["events", "polling", "refused stream"])
def test_the_script_moves_the_widget_to_the_end(env, how):
    server, _, base = env
    job = Job(server, base, count=2)
    page = Page(server, job.id)
    flags = ("--no-eventsource",) if how == "polling" else ()
    broken = page.events_url.replace("token=", "token=x") if how == "refused stream" else None
    widget = Widget(server, page, *flags, events_url=broken)
    try:
        if how == "refused stream":
            # A 403 from the stream: the script polls the status view instead.
            assert widget.next() == {"stream": 403}
        first = widget.update()
        assert first["event"]["id"] == job.id and first["widget"]["state"] in ("queued", "running")
        job.step()
        one = widget.update(lambda job: job["progress"]["current"] == 1)
        assert one["widget"] == {
            "state": "running",
            "message": "step 1 of 2",
            "percent": "50 %",
            "bar": {"value": 1, "max": 2},
        }
        job.step()
        last = widget.update(lambda job: job["finished"])
        assert last["widget"]["state"] == "succeeded"
        assert last["widget"]["bar"] == {"value": 2, "max": 2}
        # Then it stops: no stream left open, no poll after the end.
        assert widget.next() == {"done": True, "later_fetches": 0}
    finally:
        widget.close()


def test_a_web_process_streams_through_its_job_client(env, tmp_path):
    """With --web-workers the stream is served by a web process over its AMP job client."""
    _, template, base = env
    server = start_server(template, tmp_path / "server", "--workers", "1", "--web-workers", "2")
    try:
        job = Job(server, base, count=2)
        page = Page(server, job.id)
        stream = EventStream(server.port, page.events_url)
        try:
            assert stream.status == 200
            stream.until(lambda data: True)
            job.step()
            assert stream.until(lambda data: data["progress"]["current"] == 1)
            job.step()
            assert stream.until(lambda data: data["finished"])["state"] == "succeeded"
            assert stream.next_block() is None
        finally:
            stream.close()
    finally:
        server.kill()
