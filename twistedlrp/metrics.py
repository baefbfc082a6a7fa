"""
The server's Prometheus metrics (docs/metrics.md), in a registry of its own (the
global one is the site's). Several web processes share them in C{<state-dir>/metrics}
(multiprocess mode), each copying its scrape-time values every L{REFRESH_INTERVAL} s.
"""

from __future__ import annotations

import glob
import os
import struct
import time
from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.logger import Logger

log = Logger()

MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# How stale another process's scrape-time gauges may be, in multiprocess mode.
REFRESH_INTERVAL = 1.0

#: The metrics of this process, or C{None} while they are off.
current: Metrics | None = None


class Metrics:
    """The metrics of this process, in the multiprocess C{directory} or (C{None}) in memory."""

    def __init__(self, directory: str | None = None):
        from prometheus_client import CollectorRegistry, values

        self.directory = directory
        # No auto_describe: collecting the shared files at registration races a
        # sibling process creating its own (an empty file reads as struct.error).
        self.registry = CollectorRegistry(auto_describe=False)
        self._samplers: list[tuple] = []  # (name, doc, label names, read, gauge or None)
        if directory is None:
            # Chosen when each value is made: in memory, even if the
            # environment names a directory (a web process of a previous life).
            values.ValueClass = values.MutexValue
            self._own = self.registry
            self.registry.register(self)  # the sampled gauges (L{collect})
        else:
            from prometheus_client.multiprocess import MultiProcessCollector

            # prometheus_client chose its value class when first imported,
            # perhaps before the directory was named: choose again.
            values.ValueClass = values.MultiProcessValue()
            self._own = None  # the files are the registry
            MultiProcessCollector(self.registry, path=directory)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        from prometheus_client import Counter

        return Counter(name, doc, labels, registry=self._own)

    def histogram(self, name: str, doc: str, buckets, labels: tuple[str, ...] = ()):
        from prometheus_client import Histogram

        return Histogram(name, doc, labels, registry=self._own, buckets=buckets)

    def sampled(
        self, name: str, doc: str, labels: tuple[str, ...], read: Callable[[], dict]
    ) -> None:
        """Add a gauge read when scraped; C{read()} returns C{{label values: value}}."""
        gauge = None
        if self.directory is not None:
            from prometheus_client import Gauge

            gauge = Gauge(name, doc, labels, registry=None, multiprocess_mode="livesum")
        self._samplers.append((name, doc, labels, read, gauge))

    def refresh(self) -> None:
        """Multiprocess mode: copy this process's sampled values to its files."""
        for name, _, labels, read, gauge in self._samplers:
            values = _sample(name, read) if gauge is not None else None
            if values is None:
                continue
            for key, value in values.items():
                (gauge.labels(*key) if labels else gauge).set(value)

    def exposition(self) -> bytes:
        """@return: every metric of the registry in Prometheus's text format."""
        from prometheus_client import generate_latest

        if self.directory is None:
            return generate_latest(self.registry)
        # In a thread (see web/metrics.py): a file another process has just
        # created may still be empty; read again shortly, a few times.
        for _ in range(3):
            try:
                return generate_latest(self.registry)
            except (struct.error, ValueError):
                time.sleep(0.05)
        return generate_latest(self.registry)

    def collect(self):
        """In memory mode, this registry's collector of the sampled gauges: read them now."""
        from prometheus_client.core import GaugeMetricFamily

        for name, doc, labels, read, _ in self._samplers:
            values = _sample(name, read)
            if values is None:
                continue  # left out of this scrape
            family = GaugeMetricFamily(name, doc, labels=labels)
            for key, value in values.items():
                family.add_metric(list(key), value)
            yield family

    def process_ended(self, pid: int) -> None:
        """Multiprocess mode: drop the gauges of process C{pid}, which ended."""
        if self.directory is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.directory)


def _sample(name: str, read: Callable[[], dict]) -> dict | None:
    try:
        return read()
    except Exception:
        log.failure("Could not read the metric {name}", name=name)
        return None


def configure(role: str, options) -> Metrics | None:
    """@return: this process's metrics (also L{current}), or C{None}; @raise BootError."""
    global current
    if options["no-metrics"] or options["jobs-only"] and not options["metrics-listen"]:
        current = None
        return None
    directory = None
    if role == "main":
        directory = os.path.abspath(os.path.join(options["state-dir"], "metrics"))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            # Files of an earlier run would add their counts to this one's.
            for stale in glob.glob(os.path.join(directory, "*.db")):
                os.remove(stale)
        except OSError as e:
            from twistedlrp.boot import BootError

            raise BootError(f"cannot prepare the metrics directory {directory}: {e}") from e
        os.environ[MULTIPROCESS_VARIABLE] = directory
    elif role == "web":
        directory = os.environ.get(MULTIPROCESS_VARIABLE)
    else:
        os.environ.pop(MULTIPROCESS_VARIABLE, None)
    current = Metrics(directory)
    return current


def refresh_service(reactor, metrics: Metrics | None):
    """@return: the service that refreshes C{metrics} every second, if processes share them."""
    if metrics is None or metrics.directory is None:
        return None
    refresher = TimerService(REFRESH_INTERVAL, metrics.refresh)
    refresher.clock = reactor
    refresher.setName("metrics-refresh")
    return refresher
