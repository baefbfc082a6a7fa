"""
The job service's metrics (docs/metrics.md): counters and histograms the service
updates, the queue and workers read at scrape time; nothing while they are off.
"""

from __future__ import annotations

import functools

from twistedlrp.metrics import Metrics

# Seconds an attempt ran: from milliseconds (a no-op job) to an hour.
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Operations one store transaction committed together.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WORKER_STATES = ("starting", "idle", "busy", "standby", "retiring", "other")
_EVENT_HELP = {
    "submitted": "Jobs submitted (committed to the store) to this job service, by job name",
    "succeeded": "Jobs that succeeded, by job name",
    "failed": "Jobs that failed for good (no retries left), by job name",
    "cancelled": "Jobs cancelled while running, by job name",
    "retried": "Failed attempts put back in the queue for another, by job name",
}
EVENTS = tuple(_EVENT_HELP)


class _JobMetrics:
    def __init__(self, metrics: Metrics):
        self.events = {
            event: metrics.counter(f"lrp_jobs_{event}", _EVENT_HELP[event], ("name",))
            for event in EVENTS
        }
        what = "Seconds each attempt of a job ran in its worker, by job name"
        self.run_seconds = metrics.histogram("lrp_job_run_seconds", what, RUN_BUCKETS, ("name",))
        self.batch_size = metrics.histogram(
            "lrp_job_store_batch_size",
            "Operations committed together in one transaction of the job store's thread",
            BATCH_BUCKETS,
        )
        # The labelled children, by (metric, job name): labels() takes a lock
        # and checks its arguments each call, and these count every job.
        self.child = functools.cache(lambda metric, name: metric.labels(name))


_jobs: _JobMetrics | None = None


def count(event: str, name: str) -> None:
    """Count one C{event} (one of L{EVENTS}) of a job named C{name}."""
    if _jobs is not None:
        _jobs.child(_jobs.events[event], name or "?").inc()


def ran(name: str, seconds: float) -> None:
    """An attempt of a job named C{name} ran C{seconds} (it ended, however)."""
    if _jobs is not None:
        _jobs.child(_jobs.run_seconds, name or "?").observe(seconds)


def batch(size: int) -> None:
    """The store thread committed C{size} operations at once (called in that thread)."""
    if _jobs is not None:
        _jobs.batch_size.observe(size)


def watch(metrics: Metrics | None, job_service) -> None:
    """Turn the job metrics on in C{metrics} (off if C{None}) for C{job_service}."""
    global _jobs
    if metrics is None:
        _jobs = None
        return
    _jobs = _JobMetrics(metrics)
    job_service.store.observe_batch = batch
    dispatcher = job_service.dispatcher
    metrics.sampled(
        "lrp_jobs_queued",
        "Jobs queued in this job service's memory (with PostgreSQL's shared claims the "
        "table is the queue: see docs/metrics.md)",
        (),
        lambda: {(): len(dispatcher.queue)},
    )
    metrics.sampled(
        "lrp_jobs_running", "Jobs running now", (), lambda: {(): len(dispatcher.running)}
    )
    pool = dispatcher.pool

    def worker_states() -> dict:
        # Every state, 0 or not: a gauge copied to the multiprocess files
        # keeps the last value of a label no longer given.
        counts = dict.fromkeys(WORKER_STATES, 0)
        for worker in pool.workers:
            if worker.state != "dead":
                state = "busy" if worker.state == "claiming" else worker.state
                counts[state if state in counts else "other"] += 1
        return {(state,): n for state, n in counts.items()}

    metrics.sampled("lrp_job_workers", "Worker processes, by state", ("state",), worker_states)
    metrics.sampled(
        "lrp_job_workers_rss_bytes",
        "Resident memory of all worker processes together, in bytes",
        (),
        lambda: {(): sum(w.rss_mb() for w in pool.workers if w.pid) * 1024 * 1024},
    )
