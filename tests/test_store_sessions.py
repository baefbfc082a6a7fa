"""
PostgreSQL ends a job service session that a network cut left idle inside
a transaction (jobs/store/__init__.py tune_connection), so that the other
job nodes do not wait behind its row locks: without it such a session
holds them until the server's TCP keepalives give up (two hours by
default), and a node that needs those rows, its lease renewal included,
waits that long and fences all its jobs.

The "cut off node" is a child process whose connection is tuned as the
job store's are; it locks a row inside a transaction and then says
nothing more, as a node whose link went down between two statements. The
test's own connection then updates that row: it must get it within the
session limit (2 s here), not hang. The database is a fresh one on the
LRP_TEST_POSTGRES server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from support import PG_DJANGO_CHILD, pg_connect, pg_ensure, pg_name, postgres, wait_for

pytestmark = pytest.mark.skipif(not postgres(), reason="needs PostgreSQL (LRP_TEST_POSTGRES)")

SCRIPT = PG_DJANGO_CHILD + textwrap.dedent(
    """
    from django.db import connection

    from twistedlrp.jobs.store import tune_connection

    tune_connection(2, 10.0, idle_limit=2.0)
    with connection.cursor() as cursor:
        shown = {}
        for name in ("idle_in_transaction_session_timeout", "application_name"):
            cursor.execute(f"SHOW {name}")
            shown[name] = cursor.fetchone()[0]
        print(shown, flush=True)
        # The server's keepalives apply over TCP only (SHOW says 0 on a UNIX socket).
        print(connection.settings_dict["OPTIONS"]["options"], flush=True)
        connection.set_autocommit(False)
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
        cursor.execute("UPDATE t SET n = n + 1")
        print(pid, flush=True)
    # The link is down: nothing more is sent until the test says so.
    sys.stdin.readline()
    """
)


def test_a_session_left_idle_in_a_transaction_is_ended_by_the_server(tmp_path):
    db = pg_ensure(tmp_path / "sessions")
    assert db == pg_name(tmp_path / "sessions")
    with pg_connect(tmp_path / "sessions", autocommit=True) as con:
        con.execute("CREATE TABLE t (n integer)")
        con.execute("INSERT INTO t VALUES (0)")
    # A site's own server options are kept beside the job service's.
    env = dict(os.environ, DB=db, DB_OPTIONS=repr({"options": "-c application_name=cut-off-node"}))
    node = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        shown = node.stdout.readline().strip()
        assert shown == str(
            {
                "idle_in_transaction_session_timeout": "2s",
                "application_name": "cut-off-node",
            }
        ), shown
        options = node.stdout.readline().split()
        for setting in ("tcp_user_timeout=10000", "tcp_keepalives_idle=5"):
            assert setting in options, options
        pid = int(node.stdout.readline())
        with pg_connect(tmp_path / "sessions", autocommit=True) as con:
            # The row is locked by the silent session: another node's update waits...
            started = time.monotonic()
            con.execute("SET lock_timeout = '20s'")
            con.execute("UPDATE t SET n = n + 10")
            waited = time.monotonic() - started
            # ...until the server ends that session (2 s), not for hours.
            assert 1.0 < waited < 8.0, waited
            assert con.execute("SELECT n FROM t").fetchone()[0] == 10
            # Its backend leaves pg_stat_activity a moment after the lock is freed.
            sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
            wait_for(lambda: con.execute(sql, [pid]).fetchone()[0] == 0, 5, message="gone")
    finally:
        node.stdin.close()
        node.wait(timeout=30)
