"""
The job store: every database access of the job service, in threads with group
commit, and on PostgreSQL the job nodes' wake-up calls (C{LISTEN}, in a thread of its own).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp import compat
from twistedlrp.backoff import Backoff
from twistedlrp.jobs.store import batch, operations
from twistedlrp.jobs.store.batch import GroupCommitThread, StoreUnavailable

__all__ = ["Listener", "Store", "StoreUnavailable", "operations"]

log = Logger()

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
        self.availability = batch.Availability(reactor)
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


# The listener's seconds between checks of the stop flag while no notification comes.
_WAIT = 1.0


@dataclass(eq=False)
class Listener:
    """Calls C{on_notify} with each payload, C{on_reconnect} once listening (again)."""

    reactor: object
    on_notify: Callable[[str], None]
    on_reconnect: Callable[[], None]
    availability: batch.Availability
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="twistedlrp-job-listener", daemon=True).start()

    def stop(self) -> None:
        """Ask the thread to end (within about a second)."""
        self._stopping.set()

    def _connect(self):
        import psycopg
        from django.db import connections

        tune_connection(CONNECT_TIMEOUT, USER_TIMEOUT, SESSION_LIMIT)
        params = dict(connections["default"].get_connection_params())
        for name in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(name, None)
        connection = psycopg.connect(**params, autocommit=True)
        connection.execute(f"LISTEN {operations.NOTIFY_CHANNEL}")
        return connection

    def _loop(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            log.warn(
                "The job node cannot LISTEN for notifications without psycopg 3 (pip install "
                "'psycopg[binary]'): it looks for new jobs every few seconds instead"
            )
            return
        backoff = Backoff(0.25, 1.0, jitter=0.1)
        # Availability keeps whether the listener is lost: it logs a loss, or a return, once.
        while not self._stopping.is_set():
            try:
                connection = self._connect()
            except Exception as e:
                self._lost(batch.first_line(e))
                self._stopping.wait(backoff.next())
                continue
            backoff.reset()
            self.reactor.callFromThread(self.availability.back, "listener")
            self.reactor.callFromThread(self.on_reconnect)
            try:
                while not self._stopping.is_set():
                    for notify in connection.notifies(timeout=_WAIT):
                        self.reactor.callFromThread(self.on_notify, notify.payload)
            except Exception as e:
                if not self._stopping.is_set():
                    self._lost(batch.first_line(e))
            finally:
                with contextlib.suppress(Exception):
                    connection.close()

    def _lost(self, reason: str) -> None:
        reason = f"{reason} (the job listener's connection)"
        self.reactor.callFromThread(self.availability.lost, "listener", reason)
