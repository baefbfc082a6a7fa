"""
A web node and its job link, with real servers: job calls fail at once
while no job node can be reached and never take more than their share of
the threads (views that do not touch jobs keep answering), the health
endpoint shows the link, a submission whose answer is lost is sent again
by the client and makes one job, and (on PostgreSQL) a web node connected
to two job nodes keeps submitting, waiting and following jobs through the
kill -9 of the node it uses, then goes back to it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from jobsupport import FINISHED, api, rows, shared_db, start_server, wait_job
from progresssupport import EventStream, Page
from test_jobs_nodes import job_node, needs_postgres

from support import LRPProcess, free_port, port_open, request, wait_for
from twistedlrp.jobs.protocol.framing import BoxReader, encode_box

# What the docs promise: a job node that dies (kill -9, a crash) is replaced
# by the next at once; calls in flight on it are sent again.
FAILOVER = 1.0


def timed(fn, *args, **kwargs):
    """@return: (seconds, what fn returned or raised)."""
    started = time.monotonic()
    try:
        outcome = fn(*args, **kwargs)
    except Exception as e:
        outcome = e
    return time.monotonic() - started, outcome


def job_call(port: int, op: str, **data):
    """One call of the test site's jobs API view; @return: (status, JSON body)."""
    response = request(
        port, "/jobs/api", method="POST", body=json.dumps({"op": op, **data}).encode(), timeout=60
    )
    return response.status, response.json() if response.body.startswith(b"{") else response.text


class Flood:
    """Threads that make job calls in a loop until stopped; each call's (start, seconds, outcome)."""

    def __init__(self, port: int, count: int, op: str = "submit", **data):
        self.port, self.op, self.data = port, op, data
        self.calls: list[tuple[float, float, object]] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            seconds, outcome = timed(job_call, self.port, self.op, **self.data)
            self.calls.append((started, seconds, outcome))

    def stop(self):
        self._stop.set()
        for thread in self.threads:
            thread.join(70)
        assert not any(thread.is_alive() for thread in self.threads)


def hello_latencies(port: int, seconds: float) -> list[tuple[float, int]]:
    """GET /hello one after another for C{seconds}; @return: (seconds, status) of each."""
    found = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        took, response = timed(request, port, "/hello", timeout=30)
        found.append((took, response.status if not isinstance(response, Exception) else 0))
    return found


def link(server) -> dict:
    return request(server.port, "/-/health").json()["job_link"]


@pytest.mark.alone  # measures time (every call and /hello under 0.5 s)
def test_with_its_only_job_node_down_job_calls_fail_at_once_and_views_stay_fast(template, tmp_path):
    nowhere = free_port()  # nothing listens there: connections are refused
    web = start_server(
        template,
        tmp_path / "web",
        "--no-jobs",
        "--threads",
        "4",
        "--jobs-connect",
        f"tcp:host=127.0.0.1:port={nowhere}",
    )
    try:
        wait_for(lambda: link(web)["state"] == "down", 10, message="the job link down")
        health = request(web.port, "/-/health")
        # Reported, but healthy: only --health-requires-jobs makes it 503.
        assert health.status == 200, health.text
        section = health.json()["job_link"]
        assert section["node"] is None and "refused" in section["nodes"][0]["error"].lower()
        assert health.json()["threads"]["job_calls"]["max"] == 2  # half of --threads
        # A flood of job calls from 12 clients while /hello is asked.
        flood = Flood(web.port, 12, name="testapp.jobs.add", args=[1, 2])
        try:
            hellos = hello_latencies(web.port, 3.0)
        finally:
            flood.stop()
        assert len(flood.calls) > 50
        for _, seconds, (status, body) in flood.calls:
            assert status == 400 and body["error"] == "JobServiceUnavailable", body
            # Milliseconds, not LRP_JOBS_TIMEOUT (10 s): the link is known to be down.
            assert seconds < 0.5, (seconds, body)
        assert all(status == 200 for _, status in hellos), hellos
        assert max(seconds for seconds, _ in hellos) < 0.5, hellos
    finally:
        web.kill()


def test_job_calls_take_at_most_their_share_of_the_threads(template, tmp_path):
    state = tmp_path / "state"
    node = start_server(
        template, tmp_path / "node", "--jobs-only", f"--state-dir={state}", listen=False, wait=False
    )
    web = None
    try:
        wait_for(lambda: (state / "jobs.sock").exists(), 30, message="the job node's socket")
        web = start_server(
            template,
            tmp_path / "web",
            "--no-jobs",
            "--threads",
            "4",
            f"--state-dir={state}",
            env={"LRP_TEST_JOBS_TIMEOUT": "4"},
        )
        warm = api(web, "submit", name="testapp.jobs.add", args=[0, 0])["job"]
        assert wait_job(web, warm["id"])["result"] == 0
        # The job node freezes: its connection stays open, nothing answers.
        node.proc.send_signal(signal.SIGSTOP)
        try:
            flood = Flood(web.port, 8, name="testapp.jobs.add", args=[1, 2])
            try:
                wait_for(
                    lambda: (
                        request(web.port, "/-/health").json()["threads"]["job_calls"]["busy"] >= 2
                    ),
                    10,
                    message="threads in job calls",
                )
                hellos = hello_latencies(web.port, 3.0)
            finally:
                flood.stop()
        finally:
            node.proc.send_signal(signal.SIGCONT)
        # Two of the four threads at most wait for the frozen node; the other
        # two answer /hello at once, whatever the flood.
        assert all(status == 200 for _, status in hellos), hellos
        assert max(seconds for seconds, _ in hellos) < 1.0, sorted(hellos)[-5:]
        refused = [
            body
            for _, _, (status, body) in flood.calls
            if status == 400 and "--job-threads" in body["message"]
        ]
        assert refused, flood.calls[:5]
        health = request(web.port, "/-/health").json()
        assert health["threads"]["job_calls"]["refused"] >= len(refused)
        # Thawed: job calls work again.
        job = wait_for(
            lambda: (lambda r: r[1]["job"] if r[0] == 200 else None)(
                job_call(web.port, "submit", name="testapp.jobs.add", args=[2, 3])
            ),
            20,
            message="a submission after the thaw",
        )
        assert wait_job(web, job["id"])["result"] == 5
    finally:
        node.proc.send_signal(signal.SIGCONT)
        node.kill()
        if web is not None:
            web.kill()


class LosingProxy:
    """
    A UNIX socket between a web node and its job node that forwards every
    box, except that it can lose the answer to a submission: it then
    closes the connection (the job was stored; its answer never arrives).
    """

    def __init__(self, path: Path, upstream: Path):
        self.path, self.upstream = str(path), str(upstream)
        self.lose_next_submit_answer = False
        self.submits: list[bytes] = []
        self.lost = 0
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.upstream)
            asked: set[bytes] = set()
            threading.Thread(target=self._up, args=(client, server, asked), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, asked), daemon=True).start()

    def _up(self, client, server, asked):
        reader = BoxReader()
        try:
            while data := client.recv(65536):
                for box in reader.feed(data):
                    if box.get(b"_command") == b"Submit":
                        asked.add(box[b"_ask"])
                        self.submits.append(box.get(b"id"))
                    server.sendall(encode_box(box))
        except OSError:
            pass
        _close(client, server)

    def _down(self, server, client, asked):
        reader = BoxReader()
        try:
            while data := server.recv(65536):
                for box in reader.feed(data):
                    if box.get(b"_answer") in asked and self.lose_next_submit_answer:
                        self.lose_next_submit_answer = False
                        self.lost += 1
                        _close(client, server)
                        return
                    client.sendall(encode_box(box))
        except OSError:
            pass
        _close(client, server)

    def close(self):
        self.listener.close()


def _close(*socks):
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def test_a_submit_whose_answer_is_lost_is_sent_again_by_the_client_and_makes_one_job(
    template, tmp_path
):
    state = tmp_path / "state"
    node = start_server(
        template, tmp_path / "node", "--jobs-only", f"--state-dir={state}", listen=False, wait=False
    )
    web = proxy = None
    try:
        wait_for(lambda: (state / "jobs.sock").exists(), 30, message="the job node's socket")
        proxy = LosingProxy(tmp_path / "proxy.sock", state / "jobs.sock")
        web = start_server(
            template,
            tmp_path / "web",
            "--no-jobs",
            "--jobs-connect",
            f"unix:path={tmp_path / 'proxy.sock'}",
        )
        db = Path(node.env["LRP_TEST_DB"])  # the job node's store
        before = rows(db, "select count(*) from twistedlrp_job")[0][0]
        proxy.lose_next_submit_answer = True
        status, body = job_call(web.port, "submit", name="testapp.jobs.add", args=[20, 22])
        assert status == 200, body
        assert proxy.lost == 1
        # The caller gave no id: the client chose one, and sent it twice.
        assert len(proxy.submits) == 2 and proxy.submits[0] == proxy.submits[1] is not None
        job = body["job"]
        assert job["id"] == proxy.submits[0].decode()
        assert wait_job(web, job["id"])["result"] == 42
        # One job, not two.
        assert rows(db, "select count(*) from twistedlrp_job")[0][0] == before + 1
        # An explicit id keeps working, sent again the same way.
        chosen = "0e0e0e0e-0000-4000-8000-000000000001"
        proxy.lose_next_submit_answer = True
        status, body = job_call(web.port, "submit", name="testapp.jobs.add", args=[1, 1], id=chosen)
        assert status == 200 and body["job"]["id"] == chosen, body
        assert proxy.lost == 2 and proxy.submits[-2:] == [chosen.encode()] * 2
        assert rows(db, "select count(*) from twistedlrp_job")[0][0] == before + 2
    finally:
        for server in (web, node):
            if server is not None:
                server.kill()
        if proxy is not None:
            proxy.close()


def test_health_shows_the_job_link_and_a_job_node_has_a_health_endpoint(template, tmp_path):
    state = tmp_path / "state"
    health_port = free_port()
    args = ["--jobs-only", f"--state-dir={state}", "--health-listen"]
    args.append(f"tcp:{health_port}:interface=127.0.0.1")
    node = start_server(template, tmp_path / "node", *args, listen=False, wait=False)
    web = None
    try:
        wait_for(lambda: port_open(health_port), 30, message="the job node's health port")
        health = wait_for(
            lambda: (lambda r: r if r.status == 200 else None)(request(health_port, "/-/health")),
            30,
            message="the job node healthy",
        )
        assert health.json()["status"] == "running" and health.json()["jobs"]["healthy"]
        assert request(health_port, "/-/metrics").status == 404  # health only
        web = start_server(
            template,
            tmp_path / "web",
            "--no-jobs",
            "--health-requires-jobs",
            f"--state-dir={state}",
        )
        endpoint = wait_for(lambda: link(web)["node"], 10, message="the job link up")
        assert "jobs.sock" in endpoint and request(web.port, "/-/health").status == 200
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        killed = time.monotonic()

        def degraded():
            response = request(web.port, "/-/health")
            return response if response.status == 503 else None

        response = wait_for(degraded, 5, interval=0.01, message="the web node's health 503")
        assert time.monotonic() - killed < FAILOVER
        body = response.json()
        assert body["status"] == "degraded"
        assert body["job_link"]["state"] == "down" and body["job_link"]["healthy"] is False
        # The node comes back: so does the link (retried at most every 5 s).
        node = start_server(template, tmp_path / "node", *args, listen=False, wait=False)
        wait_for(lambda: request(web.port, "/-/health").status == 200, 30, message="healthy again")
        assert link(web)["state"] == "up"
    finally:
        for server in (web, node):
            if server is not None:
                server.kill()


# -- two job nodes (PostgreSQL) ------------------------------------------------------


class Load:
    """
    What views do while a job node dies: submit jobs (paced, so that the
    queue does not grow), wait for them, submit a job with progress and
    follow it on its page and its event stream, and ask /hello. Each
    request is recorded as (start, seconds, ok, what).
    """

    def __init__(self, web: LRPProcess):
        self.web = web
        self.records: list[tuple[float, float, bool, str]] = []
        self.submitted: list[str] = []
        self.streams: list[list[str]] = []
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(target=fn, daemon=True)
            for fn in (self._submit, self._submit, self._wait, self._follow, self._follow)
        ] + [threading.Thread(target=self._hello, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _record(self, started, ok, what):
        self.records.append((started, time.monotonic() - started, ok, what))

    def _submit(self):
        while not self._stop.is_set():
            started = time.monotonic()
            status, body = job_call(self.web.port, "submit", name="testapp.jobs.add", args=[1, 2])
            ok = status == 200
            if ok:
                self.submitted.append(body["job"]["id"])
            self._record(started, ok, f"submit {body}")
            self._stop.wait(0.05)  # pacing: a few dozen jobs a second in all

    def _wait(self):
        while not self._stop.is_set():
            if not self.submitted:
                self._stop.wait(0.01)
                continue
            job_id = self.submitted[-1]
            started = time.monotonic()
            status, body = job_call(self.web.port, "wait", id=job_id, timeout=20)
            ok = status == 200 and body["job"]["state"] in FINISHED
            self._record(started, ok, f"wait {body}")

    def _follow(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, body = job_call(
                    self.web.port, "submit", name="testapp.jobs.steps", args=[3, 0.1]
                )
                if status != 200:
                    self._record(started, False, f"submit {body}")
                    continue
                job_id = body["job"]["id"]
                self.submitted.append(job_id)
                page = Page(self.web, job_id)
                stream = EventStream(self.web.port, page.events_url, timeout=30)
                names = []
                try:
                    while True:
                        name, data = stream.next_event()
                        names.append(name)
                        if name != "progress" or data.get("finished"):
                            break
                finally:
                    stream.close()
                self.streams.append(names)
                ok = names[-1] == "progress" and "unavailable" not in names
                self._record(started, ok, f"follow {names}")
            except Exception as e:
                self._record(started, False, f"follow {e!r}")

    def _hello(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ok = request(self.web.port, "/hello", timeout=30).status == 200
            except OSError:
                ok = False
            self._record(started, ok, "hello")
            self._stop.wait(0.01)

    def stop(self):
        self._stop.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads)


@needs_postgres
def test_a_web_node_fails_over_between_two_job_nodes_under_load(template, tmp_path):
    db = shared_db(template, tmp_path)
    a = job_node(db, tmp_path / "a", "node-a")
    b = job_node(db, tmp_path / "b", "node-b")
    sockets = [f"unix:path={node.tmp / 'state' / 'jobs.sock'}" for node in (a, b)]
    (tmp_path / "web").mkdir()
    web = LRPProcess(
        "--no-jobs",
        "--threads",
        "16",
        "--jobs-connect",
        sockets[0],
        "--jobs-connect",
        sockets[1],
        tmp=tmp_path / "web",
        env={"LRP_TEST_DB": str(db)},
    ).start()
    load = None
    try:
        wait_for(lambda: link(web)["node"] == sockets[0], 10, message="calls going to node A")
        assert [n["state"] for n in link(web)["nodes"]] == ["up", "up"]
        load = Load(web)
        wait_for(lambda: len(load.streams) >= 2, 30, message="streams followed before the kill")
        os.kill(a.proc.pid, signal.SIGKILL)  # the node alone: its workers see it die
        a.proc.wait(10)
        killed = time.monotonic()
        wait_for(lambda: link(web)["node"] == sockets[1], 5, message="calls going to node B")
        failover = time.monotonic() - killed
        # Load through node B for a while (jobs of node A are retried after its lease).
        count = len(load.streams)
        wait_for(lambda: len(load.streams) >= count + 4, 30, message="streams through node B")
        # Node A comes back (same name): the web node goes back to it.
        a = job_node(db, tmp_path / "a", "node-a")
        back = time.monotonic()
        wait_for(lambda: link(web)["node"] == sockets[0], 15, message="calls back on node A")
        returned = time.monotonic() - back
        count = len(load.streams)
        wait_for(lambda: len(load.streams) >= count + 2, 30, message="streams through node A")
        load.stop()
        records = load.records
        # No request failed: those in flight on node A were sent again to node B.
        failed = [(round(r[0] - killed, 3), r[3]) for r in records if not r[2]]
        assert not failed, failed
        assert failover < FAILOVER, failover
        assert returned < 10, returned
        hellos = [r for r in records if r[3] == "hello"]
        assert len(hellos) > 50 and all(r[2] for r in hellos)
        assert max(r[1] for r in hellos) < 0.5, sorted(r[1] for r in hellos)[-5:]
        kinds = {r[3].split()[0] for r in records if r[2]}
        assert kinds == {"submit", "wait", "follow", "hello"}, kinds
        # Every submission is one job, and every one of them finishes.
        ids = set(load.submitted)
        assert len(ids) == len(load.submitted)
        found = rows(db, "select id, state from twistedlrp_job")
        states = {str(i): s for i, s in found if str(i) in ids}
        assert set(states) == ids
        wait_for(
            lambda: all(
                s in FINISHED
                for i, s in rows(db, "select id, state from twistedlrp_job")
                if str(i) in ids
            ),
            60,
            message="every job finished",
        )
        output = web.output()
        assert "Lost the connection to the job service at " + sockets[0] in output
        assert "Job calls go to the job service at " + sockets[1] in output
        assert "Traceback" not in output, output
        sys.stderr.write(
            f"failover {failover:.3f} s, back in {returned:.1f} s, {len(records)} requests,"
            f" none failed\n"
        )
    finally:
        if load is not None:
            load.stop()
        for server in (web, a, b):
            server.kill()
