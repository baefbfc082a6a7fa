"""
The job nodes' wake-up calls on PostgreSQL: C{LISTEN} in a thread of its own.

A submission, a retry, a job put back in the queue, a cancel and a job's
end send C{NOTIFY twistedlrp_jobs} in the same transaction as their change
(so it arrives with the commit, and not at all if the transaction rolls
back). This thread holds one connection of its own (psycopg, autocommit),
waits for notifications and hands each payload to the reactor. The reactor
never waits for it. When the connection breaks it is opened again with
back-off, and C{on_reconnect} is called (notifications may have been lost
meanwhile); the job service also polls slowly to cover anything missed.
Losing the database and having it back are reported to the store's
L{twistedlrp.jobs.store.availability.Availability}, which logs them once
for all the job service's connections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from twisted.logger import Logger

from twistedlrp.backoff import Backoff
from twistedlrp.jobs.store.availability import first_line
from twistedlrp.jobs.store.operations import NOTIFY_CHANNEL

log = Logger()

# Seconds between checks of the stop flag while no notification comes.
_WAIT = 1.0


class Listener:
    """
    @param on_notify: called in the reactor with each notification's payload.
    @param on_reconnect: called in the reactor once listening (again).
    @param alias: the Django database whose connection settings to use.
    """

    def __init__(
        self,
        reactor,
        on_notify: Callable[[str], None],
        on_reconnect: Callable[[], None],
        alias: str = "default",
        availability=None,
    ):
        self.reactor = reactor
        self.availability = availability
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.alias = alias
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="twistedlrp-job-listener", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (within about a second; it holds nothing else)."""
        self._stopping.set()

    def _connect(self):
        import psycopg
        from django.db import connections

        from twistedlrp.jobs.store import CONNECT_TIMEOUT, USER_TIMEOUT, tune_connection

        if self.alias == "default":
            tune_connection(CONNECT_TIMEOUT, USER_TIMEOUT)
        params = dict(connections[self.alias].get_connection_params())
        # Django's own cursor class and context are not needed here.
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params.pop("prepare_threshold", None)
        connection = psycopg.connect(**params, autocommit=True)
        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
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
        lost = False
        while not self._stopping.is_set():
            try:
                connection = self._connect()
            except Exception as e:
                if not lost:
                    lost = True
                    self._lost(first_line(e))
                self._stopping.wait(backoff.next())
                continue
            backoff.reset()
            self.connected = True
            if lost:
                lost = False
                self._back()
            self.reactor.callFromThread(self.on_reconnect)
            try:
                while not self._stopping.is_set():
                    for notify in connection.notifies(timeout=_WAIT):
                        self.reactor.callFromThread(self.on_notify, notify.payload)
            except Exception as e:
                if not self._stopping.is_set():
                    lost = True
                    self._lost(first_line(e))
            finally:
                self.connected = False
                try:
                    connection.close()
                except Exception:
                    pass

    def _lost(self, reason: str) -> None:
        reason = f"{reason} (the job listener's connection)"
        if self.availability is None:
            log.warn("The job store cannot be reached ({reason}); retrying", reason=reason)
        else:
            self.reactor.callFromThread(self.availability.lost, "listener", reason)

    def _back(self) -> None:
        if self.availability is not None:
            self.reactor.callFromThread(self.availability.back, "listener")
