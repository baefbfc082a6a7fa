"""
The job service's Perspective Broker front end, against a real
``twistd -n lrp --pb-listen ... --jobs-secret-file ...`` server; the PB
client runs in this process's reactor (pytest-twisted).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from jobsupport import api, make_template_db, start_server
from twisted.cred import credentials
from twisted.internet import defer
from twisted.spread import pb

from support import free_port, run_to_exit

SECRET = b"a long random secret for the pb tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pb")
    secret_file = tmp / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)  # a secret file others can read is refused
    pb_port = free_port()
    server = start_server(
        make_template_db(tmp),
        tmp / "server",
        "--pb-listen",
        f"tcp:{pb_port}:interface=127.0.0.1",
        "--jobs-secret-file",
        str(secret_file),
        # Above what PB can carry in one string (640 KiB), for the size tests.
        "--max-job-payload",
        "700000",
    )
    server.pb_port = pb_port
    yield server
    server.kill()


class Connection:
    """A PB client connection to the server (closed by L{close})."""

    def __init__(self, port: int):
        from twisted.internet import reactor

        self.factory = pb.PBClientFactory()
        self.lost = defer.Deferred()
        self.connector = reactor.connectTCP("127.0.0.1", port, self.factory, timeout=10)

    def login(self, secret: bytes) -> defer.Deferred:
        return self.factory.login(credentials.UsernamePassword(b"lrp", secret))

    async def root(self):
        root = await self.factory.getRootObject()
        root.notifyOnDisconnect(lambda ref: self.lost.callback(None))
        return root

    def close(self):
        self.factory.disconnect()


async def _connected(server):
    connection = Connection(server.pb_port)
    await connection.root()
    return connection


async def _failure_of(d: defer.Deferred) -> pb.CopiedFailure:
    """@return: the failure C{d} fails with (PB copies the server's)."""
    failures = []
    d.addErrback(failures.append)
    result = await d
    assert failures, f"the call succeeded: {result!r}"
    return failures[0]


@pytest_twisted.ensureDeferred
async def test_submit_wait_and_result(server):
    connection = await _connected(server)
    try:
        avatar = await connection.login(SECRET)
        job = await avatar.callRemote("submit", "testapp.jobs.add", [2, 3])
        assert job["name"] == "testapp.jobs.add"
        assert job["state"] in ("queued", "running", "succeeded")
        done = await avatar.callRemote("wait", job["id"], 30)
        assert done["state"] == "succeeded", done
        assert done["result"] == 5
        status = await avatar.callRemote("status", job["id"])
        assert status["result"] == 5 and status["finished_at"]
        listed = await avatar.callRemote("list_jobs", None, "testapp.jobs.add", 10)
        assert job["id"] in [j["id"] for j in listed]
        stats = await avatar.callRemote("stats")
        assert stats["jobs"].get("succeeded", 0) >= 1, stats
        # Keyword arguments and a worker process of its own.
        who = await avatar.callRemote("submit", "testapp.jobs.whoami", kwargs={})
        who = await avatar.callRemote("wait", who["id"], 30)
        assert who["state"] == "succeeded"
        assert who["result"]["pid"] != server.proc.pid
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_refused_and_disconnected(server):
    connection = await _connected(server)
    try:
        failure = await _failure_of(connection.login(b"not the secret"))
        assert failure.check("twisted.cred.error.UnauthorizedLogin"), failure.type
        assert "wrong secret" in failure.getErrorMessage()
        # The server closes the connection: no second guess on it.
        await connection.lost.addTimeout(10, _reactor())
    finally:
        connection.close()
    output = server.output()
    assert "failed to log in (wrong secret)" in output
    assert "UnauthorizedLogin" not in output  # a refusal, not a logged traceback


@pytest_twisted.ensureDeferred
async def test_nothing_but_login_before_authentication(server):
    connection = await _connected(server)
    try:
        root = await connection.factory.getRootObject()
        failure = await _failure_of(root.callRemote("submit", "testapp.jobs.add", [1, 2]))
        assert failure.check("twistedlrp.jobs.pb.JobServiceError"), failure.type
        assert "'submit': no such method before login" in failure.getErrorMessage()
    finally:
        connection.close()
    # A refusal, logged as such, not as a traceback.
    assert "called 'submit' before logging in: refused" in server.output()
    assert "Traceback" not in server.output()


@pytest_twisted.ensureDeferred
async def test_clear_errors(server):
    connection = await _connected(server)
    try:
        avatar = await connection.login(SECRET)
        failure = await _failure_of(avatar.callRemote("submit", "testapp.jobs.nope", [1]))
        assert failure.check("twistedlrp.jobs.pb.NotRegisteredError"), failure.type
        message = failure.getErrorMessage()
        assert "'testapp.jobs.nope'" in message and "testapp.jobs.add" in message
        # A set is not JSON.
        failure = await _failure_of(avatar.callRemote("submit", "testapp.jobs.echo", [{1, 2}]))
        assert failure.check("twistedlrp.jobs.pb.InvalidArgumentsError"), failure.type
        assert "JSON" in failure.getErrorMessage()
        failure = await _failure_of(avatar.callRemote("status", "no-such-job"))
        assert failure.check("twistedlrp.jobs.pb.UnknownJobError"), failure.type
        assert "no-such-job" in failure.getErrorMessage()
        # The connection is still usable after refusals.
        job = await avatar.callRemote("submit", "testapp.jobs.echo", [{"k": [1, "x"]}])
        job = await avatar.callRemote("wait", job["id"], 30)
        assert job["result"] == {"k": [1, "x"]}
    finally:
        connection.close()
    # Refusals are not internal errors, and PB logs no traceback for them.
    output = server.output()
    assert "PB job service operation" not in output
    assert "jobs/pb.py" not in output


@pytest_twisted.ensureDeferred
async def test_sizes_over_the_limits_are_refused_clearly(server):
    # A result PB cannot carry (submitted through the HTTP view, over AMP).
    big = api(server, "submit", name="testapp.jobs.echo", args=["x" * 660_000])["job"]
    assert api(server, "wait", id=big["id"])["job"]["state"] == "succeeded"
    connection = await _connected(server)
    try:
        avatar = await connection.login(SECRET)
        failure = await _failure_of(avatar.callRemote("status", big["id"]))
        assert failure.check("twistedlrp.jobs.pb.PayloadTooLargeError"), failure.type
        assert "more than Perspective Broker can carry" in failure.getErrorMessage()
        # The connection survived; arguments over --max-job-payload are refused.
        failure = await _failure_of(
            avatar.callRemote("submit", "testapp.jobs.echo", [["y" * 8000] * 100])
        )
        assert failure.check("twistedlrp.jobs.pb.PayloadTooLargeError"), failure.type
        assert "700000" in failure.getErrorMessage()
        stats = await avatar.callRemote("stats")
        assert stats["jobs"]
    finally:
        connection.close()


def test_a_pb_tcp_listener_needs_a_secret_file():
    code, output = run_to_exit("--pb-listen", f"tcp:{free_port()}:interface=127.0.0.1")
    assert code != 0
    assert "requires --jobs-secret-file" in output


def _reactor():
    from twisted.internet import reactor

    return reactor
