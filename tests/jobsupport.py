"""
Helpers of the job service tests: a migrated database template, servers
with a job store, the jobs API view, the store read straight from the
database (SQLite, or PostgreSQL with LRP_TEST_POSTGRES),
and a minimal blocking AMP client (independent of the implementation).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from support import TESTSITE, LRPProcess, pg_connect, pg_ensure, postgres, request, wait_for

FINISHED = ("succeeded", "failed", "cancelled")


_migrated: Path | None = None


def make_template_db(directory: Path) -> Path:
    """
    @return: the path of a database (SQLite, or the PostgreSQL database
        standing for it) with every migration applied: the first call of
        this test process migrates, later ones copy that database.
    """
    global _migrated
    if _migrated is None:
        # Kept apart from every test's files, so no test can change it.
        pristine = Path(tempfile.mkdtemp(prefix="lrp-migrated-")) / "template.sqlite3"
        atexit.register(shutil.rmtree, pristine.parent, True)
        _migrate(pristine)
        _migrated = pristine
    path = directory / "template.sqlite3"
    if postgres():
        pg_ensure(path, template=_migrated)
    else:
        shutil.copy(_migrated, path)
    return path


def _migrate(path: Path) -> None:
    if postgres():
        pg_ensure(path)
    env = dict(os.environ, LRP_TEST_DB=str(path))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run(
        [
            str(Path(sys.executable).with_name("django-admin")),
            "migrate",
            "-v0",
            "--settings",
            "testsite.settings",
            "--pythonpath",
            str(TESTSITE),
        ],
        check=True,
        env=env,
        cwd=TESTSITE,
        timeout=120,
    )


def shared_db(template: Path, tmp: Path) -> Path:
    """@return: the LRP_TEST_DB of a fresh copy of the template that several servers share."""
    db = tmp / "shared.sqlite3"
    if postgres():
        pg_ensure(db, template=template)
    else:
        shutil.copy(template, db)
    return db


def start_server(template: Path, tmp: Path, *args, env=None, wait=True, **kwargs) -> LRPProcess:
    """Start a server whose database is a copy of C{template} (kept if C{tmp} already has one)."""
    tmp.mkdir(parents=True, exist_ok=True)
    db = tmp / "db.sqlite3"
    if postgres():
        pg_ensure(db, template=template)
    elif not db.exists():
        shutil.copy(template, db)
    server = LRPProcess(*args, env={"LRP_TEST_DB": str(db), **(env or {})}, tmp=tmp, **kwargs)
    return server.start(wait=wait)


def api(server: LRPProcess, op: str, expect_error: bool = False, **data) -> dict:
    """Call the test site's jobs API view; @return: its JSON (the job under "job")."""
    response = request(
        server.port, "/jobs/api", method="POST", body=json.dumps({"op": op, **data}).encode()
    )
    body = response.json()
    if expect_error:
        assert response.status == 400, body
    else:
        assert response.status == 200, body
    return body


def job_state(server: LRPProcess, job_id: str) -> dict:
    return api(server, "get", id=job_id)["job"]


def wait_job(server: LRPProcess, job_id: str, states=FINISHED, timeout: float = 30) -> dict:
    """Poll get() until the job is in one of C{states}; @return: its info."""

    def check():
        info = job_state(server, job_id)
        return info if info["state"] in states else None

    return wait_for(check, timeout, interval=0.05, message=f"job {job_id} in {states}")


def rows(db: Path, sql: str, *params):
    """@return: the rows of a read-only query (C{?} placeholders) on the server's database."""
    if postgres():
        with pg_connect(db) as con:
            return con.execute(sql.replace("?", "%s"), params).fetchall()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def stored_id(job_id: str) -> str:
    """@return: a job id as the job table holds it, for L{rows}."""
    # Django keeps a UUID as 32 hex digits on SQLite, as a uuid on PostgreSQL.
    return job_id if postgres() else job_id.replace("-", "")


def count_jobs(db: Path) -> int:
    return rows(db, "select count(*) from twistedlrp_job")[0][0]


def read_pid(path: Path, timeout: float = 30) -> int:
    """Wait for a job's marker file; @return: the pid written on its first line."""
    text = wait_for(
        lambda: path.exists() and path.read_text().strip(), timeout, message=f"marker {path}"
    )
    return int(text.split()[0])


def read_tree(path: Path) -> tuple[int, int]:
    """@return: (the job's subprocess, its worker), from a process_tree marker."""
    read_pid(path)
    grandchild, worker = path.read_text().split()[:2]
    return int(grandchild), int(worker)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class AMPClient:
    """A tiny blocking AMP client: enough to test authentication from outside."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buffer = b""
        self.tag = 0

    def close(self):
        self.sock.close()

    def call(self, command: str, **arguments) -> dict:
        """@return: the answer box (as a dict of bytes), or an error box."""
        self.tag += 1
        box = {b"_command": command.encode(), b"_ask": str(self.tag).encode()}
        for key, value in arguments.items():
            box[key.encode()] = value if isinstance(value, bytes) else str(value).encode()
        data = b"".join(
            struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in box.items()
        )
        self.sock.sendall(data + b"\x00\x00")
        return self.read_box()

    def read_box(self) -> dict:
        box = {}
        while True:
            key = self._read_string()
            if key == b"":
                return box
            box[key] = self._read_string()

    def _read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _read_string(self) -> bytes:
        (length,) = struct.unpack("!H", self._read_exact(2))
        return self._read_exact(length)

    def closed_by_server(self, timeout: float = 5) -> bool:
        """@return: whether the server closes the connection within C{timeout}."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False
