"""
The job store: every database access of the job service, in one dedicated
thread with group commit (L{batch}), through a few statements in plain SQL
(L{sql}) and the operations the service runs (L{operations}).

On SQLite the store switches the database to WAL mode and opens its write
transactions with C{BEGIN IMMEDIATE}, so that it waits for (rather than
fails on) the locks of job code writing from worker processes. Progress
reports are coalesced: only the latest one per job is written, in the next
batch.
"""

from __future__ import annotations

from twisted.internet import defer

from twistedlrp.jobs.store import operations
from twistedlrp.jobs.store.batch import GroupCommitThread

__all__ = ["Store", "operations"]


class Store(GroupCommitThread):
    """The job service's store thread."""

    def __init__(self, reactor):
        super().__init__(
            reactor,
            "twistedlrp-job-store",
            write_coalesced=operations.write_progress,
            begin_batch=_begin_batch,
        )

    def set_progress(self, job_id: str, current: int, total, message: str) -> None:
        """Record a progress report; only the latest per job is written, in the next batch."""
        self.coalesce(job_id, (current, total, message))

    def prepare(self) -> defer.Deferred:
        """@return: a Deferred firing with C{None} or a reason the store cannot be used."""
        return self.run_alone(operations.prepare)


def _begin_batch() -> None:
    from django.db import connection

    # A connection the database dropped (a restart, a failover) is replaced
    # rather than failing every batch from now on. Only then: the store keeps
    # its one connection whatever CONN_MAX_AGE says (the views' setting).
    if connection.errors_occurred:
        if not connection.is_usable():
            connection.close()
        connection.errors_occurred = False
    fresh = connection.connection is None
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        if fresh:
            # Per connection, not per database file (WAL mode is kept in the file).
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA synchronous=NORMAL")
        # Wait for locks held by job code in workers instead of failing.
        connection.transaction_mode = "IMMEDIATE"
