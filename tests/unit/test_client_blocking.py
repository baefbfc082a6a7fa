"""
The job client outside the server: one blocking AMP connection that the
process's threads share, against a fake service on a UNIX socket (a thread
answering boxes).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from twistedlrp.jobs.client import blocking
from twistedlrp.jobs.client import calls as client
from twistedlrp.jobs.errors import (
    AuthenticationFailed,
    JobServiceUnavailable,
    NotRegistered,
)
from twistedlrp.jobs.workers import main as worker_main


class FakeService:
    """Answers each box with C{answer(box)}: a dict to send, or None to close the connection."""

    def __init__(self, path, answer):
        self.path = str(path)
        self.answer = answer
        self.boxes = []
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        reader = worker_main.BoxReader()
        with conn:
            while data := conn.recv(65536):
                for box in reader.feed(data):
                    self.boxes.append(box)
                    reply = self.answer(box)
                    if reply is None:
                        return
                    if reply == "silence":
                        continue
                    if isinstance(reply, tuple):
                        conn.sendall(worker_main.encode_box(reply[1]))
                        return
                    conn.sendall(worker_main.encode_box(reply))

    def close(self):
        self.listener.close()


def job_answer(box, **job):
    reply = {b"_answer": box[b"_ask"]}
    worker_main.put_big(reply, b"job", json.dumps({"id": "j1", "state": "queued", **job}).encode())
    return reply


def make_client(path, timeout=2.0, secret=None):
    endpoint = client.unix_client_endpoint(str(path))
    return blocking.BlockingClient(endpoint, blocking.socket_address(endpoint), secret, timeout)


def submit(blocking, name="app.jobs.f"):
    return blocking.request("submit", {"name": name, "payload": b'{"args":[1],"kwargs":{}}'})


@pytest.fixture
def sock_path(tmp_path):
    # Short: UNIX socket paths are limited to about 100 bytes.
    path = tmp_path / "s"
    yield path
    if path.exists():
        path.unlink()


def test_endpoint_strings_that_a_plain_socket_reaches():
    assert blocking.socket_address("unix:path=/a\\:b/jobs.sock") == (
        socket.AF_UNIX,
        "/a:b/jobs.sock",
    )
    assert blocking.socket_address("unix:/x/jobs.sock:timeout=5") == (
        socket.AF_UNIX,
        "/x/jobs.sock",
    )
    assert blocking.socket_address("tcp:host=127.0.0.1:port=7000") == (
        socket.AF_INET,
        ("127.0.0.1", 7000),
    )
    assert blocking.socket_address("tcp:example.org:7000") == (
        socket.AF_INET,
        ("example.org", 7000),
    )
    assert blocking.socket_address("tcp:host=\\:\\:1:port=7000")[0] == socket.AF_INET6
    # These need the reactor's endpoints.
    assert blocking.socket_address("tls:host=example.org:port=7000") is None
    assert blocking.socket_address("tcp:host=a:port=1:bindAddress=b") is None
    assert blocking.socket_address("tcp:host=a") is None


def test_a_submission_and_its_answer(sock_path):
    service = FakeService(sock_path, lambda box: job_answer(box, name=box[b"name"].decode()))
    blocking = make_client(sock_path)
    try:
        assert submit(blocking) == {"id": "j1", "state": "queued", "name": "app.jobs.f"}
        assert submit(blocking)["id"] == "j1"
        box = service.boxes[0]
        assert box[b"_command"] == b"Submit" and worker_main.get_big(box, b"payload").startswith(
            b"{"
        )
        # Optional arguments left out are not sent.
        assert b"priority" not in box and service.connections == 1
        # Other threads share the connection, each getting its own answer.
        answers = []
        threads = [
            threading.Thread(target=lambda: answers.append(submit(blocking))) for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(answers) == 8 and service.connections == 1
        tags = [b[b"_ask"] for b in service.boxes]
        assert len(set(tags)) == len(tags) == 10
    finally:
        service.close()


def test_many_threads_each_get_their_own_answers_whoever_reads_them(sock_path):
    service = FakeService(sock_path, lambda box: job_answer(box, id=box[b"job_id"].decode()))
    blocking = make_client(sock_path)
    wrong, failed = [], []

    def ask(thread):
        for i in range(40):
            job_id = f"{thread}-{i}"
            try:
                answer = blocking.request("status", {"job_id": job_id})
            except Exception as e:
                failed.append(e)
                return
            if answer["id"] != job_id:
                wrong.append((job_id, answer["id"]))

    try:
        threads = [threading.Thread(target=ask, args=(t,)) for t in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not failed and not wrong and service.connections == 1
        assert len(service.boxes) == 12 * 40
    finally:
        service.close()


def test_an_answer_that_is_not_amp_breaks_the_connection_not_the_client(sock_path):
    def answer(box):
        if service.connections == 1:
            return {b"k" * 300: b"x"}  # a key longer than AMP allows
        return job_answer(box)

    service = FakeService(sock_path, answer)
    try:
        # A status is sent again on a new connection.
        assert make_client(sock_path).request("status", {"job_id": "j1"})["id"] == "j1"
        assert service.connections == 2
    finally:
        service.close()


def test_the_services_errors_are_raised_as_their_own_classes(sock_path):
    def refuse(box):
        return {
            b"_error": box[b"_ask"],
            b"_error_code": b"NOT_REGISTERED",
            b"_error_description": "no job named f \u00e9".encode(),
        }

    service = FakeService(sock_path, refuse)
    try:
        with pytest.raises(NotRegistered, match="no job named f \u00e9"):
            submit(make_client(sock_path))
    finally:
        service.close()


def test_no_socket_says_so_at_once(sock_path):
    with pytest.raises(JobServiceUnavailable, match="its socket does not exist"):
        submit(make_client(sock_path))


def test_a_connection_that_breaks_during_a_submission_says_the_outcome_is_unknown(sock_path):
    service = FakeService(sock_path, lambda box: None)
    try:
        with pytest.raises(JobServiceUnavailable, match="broke during submit.*may or may not"):
            submit(make_client(sock_path))
    finally:
        service.close()


def test_no_answer_in_time(sock_path):
    service = FakeService(sock_path, lambda box: "silence")
    try:
        with pytest.raises(JobServiceUnavailable, match="did not answer status within 0.2 s"):
            make_client(sock_path, timeout=0.2).request("status", {"job_id": "j1"})
    finally:
        service.close()


def test_a_connection_the_service_closed_meanwhile_is_replaced(sock_path):
    service = FakeService(sock_path, lambda box: ("close", job_answer(box)))
    blocking = make_client(sock_path)
    try:
        # The service answers, then closes the connection (a restart) while the client is idle.
        assert submit(blocking)["id"] == "j1"
        for _ in range(200):
            if not blocking._conversation.usable():
                break
            threading.Event().wait(0.01)
        # The next call connects again, without an error.
        assert submit(blocking)["id"] == "j1"
        assert service.connections == 2
    finally:
        service.close()


def test_a_forked_child_connects_on_its_own_and_leaves_its_parents_connection_open(sock_path):
    service = FakeService(sock_path, job_answer)
    blocking = make_client(sock_path)
    try:
        assert submit(blocking)["id"] == "j1"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if submit(blocking)["id"] == "j1" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent goes on over the connection it had: the child's was its own.
        assert submit(blocking)["id"] == "j1"
        assert service.connections == 2
    finally:
        service.close()


def test_login_with_the_secret_before_anything_else(sock_path):
    secret = b"s3cret"
    nonce = os.urandom(32)

    def answer(box):
        command = box[b"_command"]
        if command == b"Challenge":
            return {b"_answer": box[b"_ask"], b"nonce": nonce}
        if command == b"Login":
            if box[b"digest"] != client.wire.digest(secret, nonce):
                return {
                    b"_error": box[b"_ask"],
                    b"_error_code": b"AUTHENTICATION_FAILED",
                    b"_error_description": b"login refused: wrong secret",
                }
            return {b"_answer": box[b"_ask"], b"ok": b"True"}
        return job_answer(box)

    service = FakeService(sock_path, answer)
    try:
        assert submit(make_client(sock_path, secret=secret))["id"] == "j1"
        assert [b[b"_command"] for b in service.boxes] == [b"Challenge", b"Login", b"Submit"]
        with pytest.raises(AuthenticationFailed, match="refused the shared secret"):
            submit(make_client(sock_path, secret=b"wrong"))
    finally:
        service.close()


# -- several endpoints ----------------------------------------------------------------


def make_several(paths, timeout=2.0):
    endpoints = [client.unix_client_endpoint(str(p)) for p in paths]
    return blocking.BlockingClient(
        endpoints, [blocking.socket_address(e) for e in endpoints], None, timeout
    )


def answered_by(name):
    return lambda box: job_answer(box, node=name)


def test_the_first_endpoint_that_answers_then_back_to_an_earlier_one(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    b = FakeService(second, answered_by("b"))
    a = None
    try:
        several = make_several([first, second])
        assert several.request("status", {"job_id": "j1"})["node"] == "b"
        a = FakeService(first, answered_by("a"))
        # The first is tried again in the background (at most every 5 s), then used.
        deadline = time.monotonic() + 12
        while several.request("status", {"job_id": "j1"})["node"] != "a":
            assert time.monotonic() < deadline, "never back to the first endpoint"
            threading.Event().wait(0.05)
        assert several.request("status", {"job_id": "j1"})["node"] == "a"
    finally:
        b.close()
        if a is not None:
            a.close()


def test_a_submission_whose_connection_breaks_goes_to_the_next_with_its_id(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    a = FakeService(first, lambda box: None if box[b"_command"] == b"Submit" else job_answer(box))
    b = FakeService(second, answered_by("b"))
    try:
        several = make_several([first, second])
        kw = {"name": "f", "payload": b"{}", "id": "22222222-2222-4222-8222-222222222222"}
        assert several.request("submit", kw)["node"] == "b"
        assert [box[b"id"] for box in a.boxes + b.boxes] == [kw["id"].encode()] * 2
        # Without an id it is not sent again.
        with pytest.raises(JobServiceUnavailable, match="may or may not"):
            make_several([first, second]).request("submit", {"name": "f", "payload": b"{}"})
    finally:
        a.close()
        b.close()


def test_with_no_endpoint_reachable_calls_fail_at_once(tmp_path):
    several = make_several([tmp_path / "a", tmp_path / "b"], timeout=5)
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(JobServiceUnavailable, match="no job service could be reached"):
            several.request("status", {"job_id": "j1"})
        assert time.monotonic() - started < 0.05
