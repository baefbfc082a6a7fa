"""The job store: every database access of the job service, in threads with group commit."""

from __future__ import annotations

import contextlib

from twisted.internet import defer

from twistedlrp import compat
from twistedlrp.jobs.store import operations
from twistedlrp.jobs.store.batch import Availability, GroupCommitThread, StoreUnavailable

__all__ = ["Store", "StoreUnavailable", "operations"]

# PostgreSQL, unless the site's OPTIONS set them: a network cut breaks the job
# service's connections within seconds, not minutes.
CONNECT_TIMEOUT = 5
USER_TIMEOUT = 10.0
KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
# And the server's side: a session a cut left idle in a transaction would hold
# its row locks for hours, every other node's lease renewal waiting behind it.
SERVER_KEEPALIVE = {
    "tcp_keepalives_idle": 5,
    "tcp_keepalives_interval": 2,
    "tcp_keepalives_count": 3,
}
SESSION_LIMIT = 10.0


def session_limit(lease: float | None) -> float:
    """@return: the seconds a session may stay idle in a transaction: a third of the lease."""
    return SESSION_LIMIT if lease is None else min(max(lease / 3, 2.0), SESSION_LIMIT)


class Store(GroupCommitThread):
    """
    The store thread, a reader thread in autocommit (on SQLite it never waits for
    a writer's lock) and, with several job nodes, a L{lease} thread no batch delays.
    """

    def __init__(self, reactor, lease_interval: float | None, idle_limit: float):
        def tuned(connect_timeout=CONNECT_TIMEOUT, user_timeout=USER_TIMEOUT):
            return lambda: tune_connection(connect_timeout, user_timeout, idle_limit)

        def beside(name, setup) -> GroupCommitThread:
            thread = GroupCommitThread(reactor, name, begin_batch=_begin_batch, setup=setup)
            thread.availability = self.availability
            self._beside.append(thread)
            return thread

        name = "twistedlrp-job-store"
        super().__init__(reactor, name, operations.write_progress, _begin_batch, tuned())
        self.availability = Availability(reactor)
        self._beside: list[GroupCommitThread] = []
        self.reader = beside("twistedlrp-job-reads", tuned())
        self.lease: GroupCommitThread = self
        if lease_interval is not None:
            self.lease = beside("twistedlrp-job-lease", tuned(2, max(2 * lease_interval, 1.0)))

    def start(self) -> None:
        super().start()
        for thread in self._beside:
            thread.start()

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once every thread has ended."""
        threads = [super().stop(), *(thread.stop() for thread in self._beside)]
        return defer.gatherResults(threads).addCallback(lambda _: None)

    @property
    def away(self) -> str | None:
        """@return: why the store cannot be reached now, or C{None} when it can."""
        return self.availability.reason

    def read(self, fn, *args, within: float | None = None) -> defer.Deferred:
        """@return: a Deferred of C{fn(*args)}, which only reads, run in the reader thread."""
        return self.reader.run(fn, *args, within=within, alone=True)

    def set_progress(self, job_id: str, current: int, total, message: str) -> None:
        """Record a progress report; only the latest per job is written, in the next batch."""
        self.coalesce(job_id, (current, total, message))

    def prepare(self, within: float | None = None) -> defer.Deferred:
        """@return: a Deferred firing with C{None} or a reason the store cannot be used."""
        return self.run(operations.prepare, within=within, alone=True)


def tune_connection(connect_timeout: int, user_timeout: float, idle_limit: float) -> None:
    """On PostgreSQL, give this thread's next connection the timeouts and keepalives above."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    wanted = {"connect_timeout": max(int(connect_timeout), 2), **KEEPALIVE}
    if _libpq_version() >= 120000:
        wanted["tcp_user_timeout"] = int(user_timeout * 1000)
    options = {**wanted, **(connection.settings_dict.get("OPTIONS") or {})}
    server = {
        "idle_in_transaction_session_timeout": int(idle_limit * 1000),
        **SERVER_KEEPALIVE,
        "tcp_user_timeout": int(user_timeout * 1000),
    }
    given = str(options.get("options") or "")
    extra = [f"-c {name}={value}" for name, value in server.items() if name not in given]
    options["options"] = " ".join([given, *extra]).strip()
    # This thread's connection object only: the settings' dict is shared.
    connection.settings_dict = {**connection.settings_dict, "OPTIONS": options}


def _libpq_version() -> int:
    with contextlib.suppress(ImportError):
        import psycopg

        return psycopg.pq.version()
    with contextlib.suppress(ImportError, AttributeError):
        import psycopg2.extensions

        return psycopg2.extensions.libpq_version()
    return 0


def _begin_batch() -> None:
    from django.db import connection

    # Replace a connection the database dropped (a failover), but only then:
    # the store keeps its one connection whatever CONN_MAX_AGE says.
    if compat.take_connection_errors(connection):
        if connection.connection is not None and not connection.is_usable():
            connection.close()
    fresh = connection.connection is None
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        if fresh:
            # Per connection, not per database file (WAL mode is kept in the file):
            # durable against process crashes; a power loss may lose the last commits.
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA synchronous=NORMAL")
        # Wait for locks held by job code in workers instead of failing.
        connection.transaction_mode = "IMMEDIATE"
