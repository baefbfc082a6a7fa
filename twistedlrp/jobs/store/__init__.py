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
    """
    The job service's store thread, and beside it a reader thread with a
    connection of its own for reads (L{read}): they run in autocommit, so
    on SQLite (WAL) they never wait for a writer's lock, neither the
    store's nor that of a site's transaction (a view inside C{atomic()}
    that reads a job would otherwise wait for itself).
    """

    def __init__(self, reactor):
        super().__init__(
            reactor,
            "twistedlrp-job-store",
            write_coalesced=operations.write_progress,
            begin_batch=_begin_batch,
        )
        self.reader = GroupCommitThread(
            reactor, "twistedlrp-job-reads", write_coalesced=_nothing, begin_batch=_begin_batch
        )

    def start(self) -> None:
        super().start()
        self.reader.start()

    def stop(self) -> defer.Deferred:
        """@return: a Deferred that fires once both threads have ended."""
        reads = self.reader.stop()
        writes = super().stop()
        return defer.gatherResults([writes, reads]).addCallback(lambda _: None)

    def read(self, fn, *args) -> defer.Deferred:
        """
        Run C{fn(*args)}, which only reads, in the reader thread, outside any
        transaction: it sees what was committed when it runs.

        @return: a Deferred firing in the reactor with C{fn}'s result.
        """
        return self.reader.run_alone(fn, *args)

    def set_progress(self, job_id: str, current: int, total, message: str) -> None:
        """Record a progress report; only the latest per job is written, in the next batch."""
        self.coalesce(job_id, (current, total, message))

    def prepare(self) -> defer.Deferred:
        """@return: a Deferred firing with C{None} or a reason the store cannot be used."""
        return self.run_alone(operations.prepare)


def _nothing(_coalesced: dict) -> None:
    pass


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
