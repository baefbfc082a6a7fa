"""
The faster worker paths: the child's own AMP framing (it runs no Twisted
reactor) against Twisted's AMP, and the standby successor that takes over
from a worker at its job limit without start-up time. No processes.
"""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.protocols import amp

from twistedlrp.jobs.protocol import wire
from twistedlrp.jobs.workers import main as worker_main
from twistedlrp.jobs.workers.pool import WorkerPool, standby_ahead

# -- framing -----------------------------------------------------------------------


def test_boxes_the_child_writes_are_what_twisted_amp_reads():
    box = {b"_command": b"ReportProgress", b"job_id": b"j1", b"current": b"3", b"message": b"hi"}
    worker_main.put_big(box, b"outcome", b"x" * 200_000)
    data = worker_main.encode_box(box)
    receiver = _Receiver()
    protocol = amp.BinaryBoxProtocol(receiver)
    protocol.makeConnection(_NullTransport())
    # In small pieces, as a pipe may deliver them.
    for i in range(0, len(data), 777):
        protocol.dataReceived(data[i : i + 777])
    (received,) = receiver.boxes
    assert received[b"current"] == b"3" and received[b"outcome"] == b"4"
    joined = {}
    wire.BigBytes().fromBox(b"outcome", dict(received), joined, None)
    assert joined["outcome"] == b"x" * 200_000


def test_the_child_reads_the_boxes_twisted_amp_writes():
    big = json.dumps({"args": ["y" * 150_000], "kwargs": {}}).encode()
    strings = amp._objectsToStrings(
        {"job_id": "j\u00e9", "name": "app.jobs.f", "payload": big, "attempt": 2},
        wire.RunJob.arguments,
        amp.AmpBox(),
        None,
    )
    strings[b"_command"] = b"RunJob"
    strings[b"_ask"] = b"7"
    data = strings.serialize() + amp.AmpBox(_command=b"CancelJob", job_id=b"j2").serialize()
    reader = worker_main.BoxReader()
    boxes = []
    for i in range(0, len(data), 1000):
        boxes += reader.feed(data[i : i + 1000])
    first, second = boxes
    assert first[b"_ask"] == b"7" and first[b"job_id"].decode() == "j\u00e9"
    assert worker_main.get_big(first, b"payload") == big
    assert second == {b"_command": b"CancelJob", b"job_id": b"j2"}


def test_the_conversation_answers_a_job_after_its_last_progress_report(tmp_path):
    commands_r, commands_w = os.pipe()
    answers_r, answers_w = os.pipe()
    conversation = worker_main.Conversation(1024, commands_r, answers_w)
    conversation._report("j1", 1, 10, "first")
    conversation._report("j1", 2, 10, "latest")
    with conversation._write_lock:
        conversation._send_progress()
        conversation.send({b"_answer": b"1", b"outcome": b"1", b"outcome.0": b"{}"})
    os.close(answers_w)
    data = b""
    while chunk := os.read(answers_r, 65536):
        data += chunk
    progress, answer = worker_main.BoxReader().feed(data)
    # Only the latest report waited, and it went first.
    assert progress[b"_command"] == b"ReportProgress" and progress[b"message"] == b"latest"
    assert progress[b"current"] == b"2" and progress[b"total"] == b"10"
    assert answer[b"_answer"] == b"1"
    for fd in (commands_r, commands_w, answers_r):
        os.close(fd)


class _Receiver:
    def __init__(self):
        self.boxes = []

    def startReceivingBoxes(self, sender):
        pass

    def ampBoxReceived(self, box):
        self.boxes.append(box)

    def stopReceivingBoxes(self, reason):
        pass


class _NullTransport:
    def write(self, data):
        pass

    def writeSequence(self, data):
        pass

    def getPeer(self):
        return None

    def getHost(self):
        return None


# -- standby successors --------------------------------------------------------------


class _FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, worker, *args, **kwargs):
        self.spawned.append(worker)


def make_pool(size=1):
    reactor = _FakeReactor()
    ready, died = [], []
    # The template is a real process (tests/test_jobs_template.py).
    options = {
        "workers": size,
        "pythonpath": [],
        "max-job-payload": 1024,
        "no-worker-template": True,
    }
    pool = WorkerPool(
        reactor,
        options,
        "testsite.settings",
        {},
        on_ready=ready.append,
        on_died=lambda *a: died.append(a),
        on_progress=lambda *a: None,
    )
    return reactor, pool, ready


def become_ready(worker, pid):
    worker.pid = pid
    worker.became_ready()


def run_jobs(pool, worker, count: int) -> list:
    """Let C{worker} finish C{count} jobs (limit 100); @return: what job_done said after each."""
    answers = []
    for _ in range(count):
        worker.state = "busy"
        answers.append(pool.job_done(worker, 100, 0))
    return answers


def retire_without_a_pipe(worker):
    worker.state = "retiring"
    worker.kill_reason = "retire"


def test_how_far_ahead_a_standby_starts():
    assert standby_ahead(0) == standby_ahead(99) == 0
    assert standby_ahead(100) == 5 and standby_ahead(1000) == 50 and standby_ahead(10**6) == 50


def test_a_standby_successor_takes_over_at_the_job_limit(monkeypatch):
    monkeypatch.setattr("twistedlrp.jobs.workers.pool.Worker.retire", retire_without_a_pipe)
    reactor, pool, ready = make_pool()
    pool.start()
    (first,) = reactor.spawned
    become_ready(first, 101)
    assert ready == [first]
    assert all(run_jobs(pool, first, 94))
    assert len(reactor.spawned) == 1
    assert run_jobs(pool, first, 1) == [True]  # the 95th job: a standby starts
    (_, standby) = reactor.spawned
    become_ready(standby, 102)
    # Ready, but it waits: never two workers taking jobs for one slot.
    assert standby.state == "standby" and ready == [first]
    assert pool.idle() == [first]
    available = run_jobs(pool, first, 5)[-1]
    # The 100th job: the worker retires and its successor is idle at once.
    assert available and first.state == "retiring" and standby.state == "idle"
    assert pool.idle() == [standby]
    first.exited = True
    pool.on_ended(first, "exited with code 0")
    # No third process: the successor has taken its place.
    assert len(reactor.spawned) == 2 and pool.workers == [standby]


def test_a_successor_still_starting_takes_jobs_once_ready(monkeypatch):
    monkeypatch.setattr("twistedlrp.jobs.workers.pool.Worker.retire", retire_without_a_pipe)
    reactor, pool, ready = make_pool()
    pool.start()
    (first,) = reactor.spawned
    become_ready(first, 101)
    available = run_jobs(pool, first, 100)[-1]
    (_, successor) = reactor.spawned
    assert not available and successor.state == "starting"
    pool.on_ended(first, "exited with code 0")
    assert len(reactor.spawned) == 2
    become_ready(successor, 102)
    assert successor.state == "idle" and ready == [first, successor]


def test_a_worker_that_dies_hands_over_to_its_standby(monkeypatch):
    monkeypatch.setattr("twistedlrp.jobs.workers.pool.Worker.retire", retire_without_a_pipe)
    reactor, pool, ready = make_pool()
    pool.start()
    (first,) = reactor.spawned
    become_ready(first, 101)
    run_jobs(pool, first, 96)
    (_, standby) = reactor.spawned
    become_ready(standby, 102)
    pool.on_ended(first, "killed by signal 9 (SIGKILL)")
    assert standby.state == "idle" and ready == [first, standby]
    assert len(reactor.spawned) == 2


def test_a_standby_that_dies_is_not_replaced_until_needed(monkeypatch):
    monkeypatch.setattr("twistedlrp.jobs.workers.pool.Worker.retire", retire_without_a_pipe)
    reactor, pool, ready = make_pool()
    pool.start()
    (first,) = reactor.spawned
    become_ready(first, 101)
    run_jobs(pool, first, 95)
    (_, standby) = reactor.spawned
    become_ready(standby, 102)
    standby.state = "dead"  # as processExited does
    pool.on_ended(standby, "killed by signal 9 (SIGKILL)")
    assert len(reactor.spawned) == 2
    run_jobs(pool, first, 5)
    pool.on_ended(first, "exited with code 0")
    # The usual replacement, then.
    assert len(reactor.spawned) == 3 and reactor.spawned[2].standby is False


def test_stopping_retires_a_standby(monkeypatch):
    retired = []
    monkeypatch.setattr("twistedlrp.jobs.workers.pool.Worker.retire", lambda w: retired.append(w))
    reactor, pool, ready = make_pool()
    pool.start()
    (first,) = reactor.spawned
    become_ready(first, 101)
    run_jobs(pool, first, 95)
    (_, standby) = reactor.spawned
    become_ready(standby, 102)
    first.state = "busy"
    pool.stop_idle()
    assert retired == [standby]
