"""The job nodes' wake-up calls on PostgreSQL: C{LISTEN} in a thread of its own."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.logger import Logger

from twistedlrp.backoff import Backoff
from twistedlrp.jobs.store.batch import Availability, first_line
from twistedlrp.jobs.store.operations import NOTIFY_CHANNEL

log = Logger()

# Seconds between checks of the stop flag while no notification comes.
_WAIT = 1.0


@dataclass(eq=False)
class Listener:
    """Calls C{on_notify} with each payload, C{on_reconnect} once listening (again)."""

    reactor: object
    on_notify: Callable[[str], None]
    on_reconnect: Callable[[], None]
    availability: Availability
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="twistedlrp-job-listener", daemon=True).start()

    def stop(self) -> None:
        """Ask the thread to end (within about a second)."""
        self._stopping.set()

    def _connect(self):
        import psycopg
        from django.db import connections

        from twistedlrp.jobs import store

        store.tune_connection(store.CONNECT_TIMEOUT, store.USER_TIMEOUT, store.SESSION_LIMIT)
        params = dict(connections["default"].get_connection_params())
        for name in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(name, None)
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
        # Availability keeps whether the listener is lost: it logs a loss, or a return, once.
        while not self._stopping.is_set():
            try:
                connection = self._connect()
            except Exception as e:
                self._lost(first_line(e))
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
                    self._lost(first_line(e))
            finally:
                with contextlib.suppress(Exception):
                    connection.close()

    def _lost(self, reason: str) -> None:
        reason = f"{reason} (the job listener's connection)"
        self.reactor.callFromThread(self.availability.lost, "listener", reason)
