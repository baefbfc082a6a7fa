"""
Starting real ``twistd -n lrp`` processes for the tests, and talking to them.

Every wait here polls with a deadline; nothing sleeps a fixed time in place
of synchronisation.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTSITE = HERE / "testsite"
ROOT = HERE.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


# -- PostgreSQL (LRP_TEST_POSTGRES) ------------------------------------------
#
# The test site's settings map each LRP_TEST_DB path to a database of its
# own; these create them (empty, or as a copy of a migrated template) and
# drop them at the end of the session.

_created_databases: list[str] = []


def postgres() -> str | None:
    """@return: the libpq connection string of the PostgreSQL test server, if any."""
    return os.environ.get("LRP_TEST_POSTGRES") or None


def pg_name(db_path) -> str:
    """@return: the PostgreSQL database standing for LRP_TEST_DB=C{db_path} (as in settings)."""
    import hashlib

    return "lrp_test_" + hashlib.sha1(str(db_path).encode()).hexdigest()[:20]


def pg_connect(db_path=None, **kwargs):
    """@return: a psycopg connection to the database of C{db_path}, or to the server's own."""
    import psycopg

    extra = {"dbname": pg_name(db_path)} if db_path is not None else {}
    return psycopg.connect(postgres(), **extra, **kwargs)


def pg_ensure(db_path, template=None) -> str:
    """Create the database of C{db_path} (a copy of C{template}'s) unless this session did."""
    name = pg_name(db_path)
    if name in _created_databases:
        return name
    with pg_connect(autocommit=True) as con:
        if con.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
            # Left by an earlier session that did not finish (same --basetemp).
            con.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        sql = f'CREATE DATABASE "{name}"'
        if template is not None:
            sql += f' TEMPLATE "{pg_name(template)}"'
        con.execute(sql)
    _created_databases.append(name)
    return name


# The start of a child script (python -c) that sets Django up with
# twistedlrp on the database named by its DB environment variable, on the
# LRP_TEST_POSTGRES server; DB_OPTIONS (a Python literal) is the database's
# OPTIONS. For tests of the job store's own connection handling.
PG_DJANGO_CHILD = """\
import ast, os, sys
import django
from django.conf import settings
from psycopg.conninfo import conninfo_to_dict

pg = conninfo_to_dict(os.environ["LRP_TEST_POSTGRES"])
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "twistedlrp"],
    DATABASES={"default": {
        "ENGINE": "django.db.backends.postgresql", "NAME": os.environ["DB"],
        "USER": pg.pop("user", ""), "HOST": pg.pop("host", ""), "PORT": pg.pop("port", ""),
        "OPTIONS": ast.literal_eval(os.environ.get("DB_OPTIONS", "{}")),
    }},
    USE_TZ=True,
)
django.setup()
"""


def pg_drop_created() -> None:
    """Drop the databases this session created (servers still connected are cut off)."""
    if not _created_databases:
        return
    with pg_connect(autocommit=True) as con:
        while _created_databases:
            con.execute(f'DROP DATABASE IF EXISTS "{_created_databases.pop()}" WITH (FORCE)')


class PostgresControl:
    """
    Stops and starts the PostgreSQL test server (LRP_TEST_POSTGRES) itself,
    as its owner, to simulate a database restart: found through the server
    (its data directory, its binaries, the options it was started with).
    L{available} is False (the test skips) when this process cannot do it.
    """

    def __init__(self):
        import pwd
        import shlex

        self.available = False
        self.why = ""
        try:
            with pg_connect(autocommit=True) as con:
                self.data = con.execute("SHOW data_directory").fetchone()[0]
                bindir = con.execute(
                    "SELECT setting FROM pg_config WHERE name = 'BINDIR'"
                ).fetchone()[0]
            words = shlex.split(Path(self.data, "postmaster.opts").read_text())
        except Exception as e:
            self.why = f"cannot control the PostgreSQL server: {e}"
            return
        options, skip = [], False
        for word in words[1:]:
            if skip:
                skip = False
            elif word == "-D":
                skip = True
            else:
                options.append(word)
        self.options = shlex.join(options)
        self.pg_ctl = str(Path(bindir) / "pg_ctl")
        owner = Path(self.data).stat().st_uid
        self.prefix = []
        if os.getuid() != owner:
            if os.getuid() != 0:
                self.why = "the PostgreSQL server belongs to another user"
                return
            self.prefix = ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--"]
        self.available = True

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, self.pg_ctl, "-D", self.data, *args],
            check=True,
            timeout=90,
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stop the server as an operator would (fast: sessions are ended, no wait for them)."""
        self._pg_ctl("-m", "fast", "-w", "-t", "60", "stop")

    def start(self) -> None:
        log = os.path.join(self.data, "lrp-test-restart.log")
        self._pg_ctl("-l", log, "-w", "-t", "60", "-o", self.options, "start")

    def running(self) -> bool:
        return Path(self.data, "postmaster.pid").exists()


class PausableProxy:
    """
    A UNIX socket in front of the PostgreSQL test server, for one process
    to connect through (as C{host} of its LRP_TEST_POSTGRES): L{pause}
    holds every byte in both directions and lets no new connection reach
    the server, as a network cut does (connections stay open, nothing
    answers); L{resume} lets everything through again.
    """

    def __init__(self):
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(postgres())
        host = params.get("host") or "/var/run/postgresql"
        port = int(params.get("port") or 5432)
        self.target = (
            os.path.join(host, f".s.PGSQL.{port}") if host.startswith("/") else (host, port)
        )
        # Short: a UNIX socket's path has at most 107 bytes.
        self.directory = tempfile.mkdtemp(prefix="lrp-pg-", dir="/tmp")
        params["host"] = self.directory
        self.conninfo = " ".join(f"{k}={v}" for k, v in params.items())
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(os.path.join(self.directory, f".s.PGSQL.{port}"))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        import shutil

        self._closed = True
        self._flowing.set()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def _wait_flowing(self) -> bool:
        while not self._flowing.wait(0.5):
            if self._closed:
                return False
        return not self._closed

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        if not self._wait_flowing():
            return
        family = socket.AF_UNIX if isinstance(self.target, str) else socket.AF_INET
        upstream = socket.socket(family)
        self._sockets.append(upstream)
        try:
            upstream.connect(self.target)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        self._pump(upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data or not self._wait_flowing():
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _port_range() -> range:
    # Tests run in parallel (pytest-xdist): each worker takes ports from a
    # range of its own, below the kernel's ephemeral range, so a port handed
    # to a server is neither handed to another worker nor taken meanwhile by
    # some outgoing connection's local end (as a port the kernel picked for
    # bind(0) and that was then closed can be).
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = 12000 + (index % 16) * 1200
    return range(start, start + 1200)


_ports = _port_range()
# A start of its own for each test process, so that two suites running at
# once on one machine (two checkouts) rarely hand out the same port.
_next_port = os.getpid() * 7919 % len(_ports)


def free_port() -> int:
    """@return: a loopback TCP port that nobody listens on, for this worker only."""
    global _next_port
    for _ in range(len(_ports)):
        port = _ports[_next_port % len(_ports)]
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {_ports}")


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02, message: str = ""):
    """Poll C{predicate} until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def read_to_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """
    @return: everything the server sends on C{sock} until it closes (a reset
        counts as closed).
    @raise AssertionError: if it keeps the connection open for C{timeout}
        seconds without sending anything (naming what it sent before).
    """
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was kept open after {data!r}") from None
    return data


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        import json

        return json.loads(self.body)


def request(
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 30.0,
    host: str = "127.0.0.1",
) -> Response:
    """One HTTP request on its own connection; returns status, headers, body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


class LRPProcess:
    """
    A C{twistd -n lrp} child process serving the test site.

    @param args: extra C{twistd lrp} arguments.
    @param env: extra environment variables (the test site reads some).
    """

    def __init__(
        self,
        *args: str,
        env: dict | None = None,
        settings: str | None = "testsite.settings",
        cwd: Path | None = None,
        listen: bool = True,
        tmp: Path | None = None,
        twistd_args: tuple = (),
    ):
        self.tmp = Path(tmp or tempfile.mkdtemp(prefix="lrp-test-"))
        self.port = free_port()
        self.cwd = cwd or TESTSITE
        self.args = list(args)
        if listen and not any(a == "--listen" or a.startswith("--listen=") for a in args):
            self.args += ["--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        if settings and not any(a.startswith("--settings") for a in args):
            self.args += ["--settings", settings]
        # One job worker unless the test names a number (the server's default
        # is 2): a worker is a Python process setting Django up, half of what
        # a test server costs in CPU, and the suite's CPU is what bounds it.
        if not any(a.startswith(("--workers", "--config", "--app", "--no-jobs")) for a in args):
            self.args += ["--workers", "1"]
        if not any(a.startswith("--state-dir") for a in args):
            self.args += ["--state-dir", str(self.tmp / "state")]
        self.env = dict(os.environ)
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self.env.setdefault("LRP_TEST_DB", str(self.tmp / "db.sqlite3"))
        self.env.update(env or {})
        self.twistd_args = list(twistd_args)
        self.log_path = self.tmp / "output.log"
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return [TWISTD, "-n", "--pidfile=", *self.twistd_args, "lrp", *self.args]

    def start(self, wait: bool = True, timeout: float = 30.0) -> LRPProcess:
        if self.env.get("LRP_TEST_POSTGRES"):
            pg_ensure(self.env["LRP_TEST_DB"])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if not port_open(self.port):
                return False
            try:
                # Up to the deadline, not less: a probe given up on while the
                # server still answers it would be counted later, in the
                # middle of a test that counts requests (test_metrics).
                health = request(
                    self.port, "/-/health", timeout=max(2.0, deadline - time.monotonic())
                )
            except OSError:
                return False
            # "degraded": serving, but a part is not working (many tests run
            # on a database without the job tables, whose job service says so).
            return health.status == 200 or (
                health.status == 503 and b'"status": "degraded"' in health.body
            )

        wait_for(ready, timeout, message=f"the server on port {self.port}")

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, **kwargs) -> Response:
        return request(self.port, path, **kwargs)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, number=signal.SIGTERM) -> None:
        self.proc.send_signal(number)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"server still running after {timeout} s:\n{self.output()}"
            ) from None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


def run_to_exit(
    *args: str,
    env: dict | None = None,
    timeout: float = 60.0,
    settings="testsite.settings",
    cwd: Path | None = None,
) -> tuple[int, str]:
    """Start a server that is expected to fail; return (exit code, output)."""
    server = LRPProcess(*args, env=env, settings=settings, cwd=cwd)
    server.start(wait=False)
    try:
        code = server.proc.wait(timeout)
    finally:
        server.kill()
    return code, server.output()


class BackgroundRequest(threading.Thread):
    """A request sent from a thread; C{result} is the Response or the exception."""

    def __init__(self, port: int, path: str, **kwargs):
        super().__init__(daemon=True)
        self.port, self.path, self.kwargs = port, path, kwargs
        self.result = None
        self.finished_at = None

    def run(self):
        try:
            self.result = request(self.port, self.path, **self.kwargs)
        except Exception as e:
            self.result = e
        self.finished_at = time.monotonic()

    def outcome(self, timeout: float = 60.0):
        self.join(timeout)
        assert not self.is_alive(), f"request {self.path} still running after {timeout} s"
        return self.result
