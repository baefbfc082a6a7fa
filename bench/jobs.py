"""
Run the same no-op job through twistedlrp's job service and through Celery
with Redis in the same run, and report, side by side with the ratio to
Celery: jobs/s from many threads and from one, the latency of one job at a
time, submissions from a view, and idle memory.

    make bench-jobs                    # installs celery and redis (the client) first
    .venv/bin/python bench/jobs.py --jobs 500 --systems lrp

Both systems serve `bench/jobsite` (SQLite in a fresh temporary directory)
with two worker processes each: `twistd -n lrp --workers 2` (job service in
the server, migrated first), and `celery worker --pool prefork --concurrency
2` with a throwaway redis-server (no persistence) as broker and result
backend. Both are started first and warmed up; then each phase runs on one
system, then on the other, so that both see the same machine:

- idle memory: RSS and PSS summed over every process (lrp's server and its
  workers; Celery's worker, its pool and redis-server), after a second idle;
  and the same for a job node alone (`twistd lrp --jobs-only`, its own
  database and state directory, the same warm-up), which like Celery's side
  serves no HTTP; and once more after all the phases, when lrp's workers
  have been replaced and its worker template runs; then, on that job node,
  the median round trip of `jobs.get`, `jobs.stats` and a durable submit
  from another process (`--round-trips`, 1000), one at a time;
- many: N jobs (`--jobs`, 2000) from T threads (`--threads`, 10) of this
  process (`noop.submit(i)` over the server's UNIX socket; `noop.delay(i)`);
  jobs/s counts from the first submission to the last finish as the system
  recorded it (`finished_at`; Celery's `date_done`), with submit latency and
  the CPU seconds each side's processes used meanwhile (from /proc);
- single: the same from one thread (`--single-jobs`, 1000);
- latency: one job at a time, submit then wait until it is seen finished
  (`jobs.wait`; `AsyncResult.get`), p50 and p99 (`--latency-jobs`, 300);
- view: a view of lrp's server submits jobs one after the other, timing
  each, through lrp's job client (the service in the same process) and
  through Celery's `delay()` (`--view-jobs`, 300).

Every phase checks that each of its jobs succeeded once with its own result.
Both run with their defaults otherwise: lrp replaces a worker after 1000 jobs
(`--max-jobs-per-worker`; `--lrp-args` passes options), Celery's prefork
children live on. Celery is skipped, with a message, when redis-server
(Debian: apt-get install redis-server) or the celery and redis packages are
missing, or when it does not start.
"""

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from _shared import _stat, descendants, free_port, report

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
log = logging.getLogger("bench")


def percentile(values: list[float], q: float) -> float:
    """@return: the nearest-rank C{q} quantile (0 < q <= 1) of C{values}."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def start(command: list[str], logfile: Path, env: dict) -> subprocess.Popen:
    with open(logfile, "ab") as out:
        return subprocess.Popen(
            command,
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen | None) -> None:
    """
    SIGTERM to the main process only (it stops its own workers, as under
    systemd's KillMode=mixed), then SIGKILL to whatever is left of its session.
    """
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within 30 s: killed", proc.args[0])
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class NotStarted(RuntimeError):
    """A system did not start."""


def wait_for(check, what, procs, timeout: float, every: float = 0.02, error=RuntimeError):
    """Call C{check} until it returns something true; fail if a process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise error(f"{what}: {proc.args[0]} exited with {proc.returncode}")
        try:
            value = check()
        except Exception as e:  # not up yet
            value, last = None, e
        else:
            last = None
        if value:
            return value
        time.sleep(every)
    raise error(f"{what}: not within {timeout:g} s" + (f" ({last})" if last else ""))


def session_cpu(leader: int) -> tuple[float, float]:
    """
    @return: CPU seconds (user + system) of the process C{leader} and of the
        processes below it: live ones (workers lead sessions of their own, so
        this follows parents, not the session) plus those already reaped.
    """
    tick = os.sysconf("SC_CLK_TCK")
    own = others = 0.0
    for pid in [leader, *descendants(leader)]:
        fields = _stat(pid)
        if fields is None:
            continue
        utime, stime, cutime, cstime = (int(f) / tick for f in fields[11:15])
        if pid == leader:
            own, others = own + utime + stime, others + cutime + cstime
        else:
            others += utime + stime + cutime + cstime
    return own, others


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def memory_mib(pids: list[int]) -> dict:
    """@return: the summed RSS and PSS (MiB) of C{pids} (PSS shares copy-on-write pages out)."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "processes": len(pids)}


def client_cpu() -> float:
    t = os.times()
    return t.user + t.system


def submit_all(submit, n: int, threads: int) -> tuple[float, list[float], list[str]]:
    """
    Submit jobs 0 .. n-1 from C{threads} threads, job i from thread i % threads.

    @return: the wall time of the first submission, every submission's
        latency in seconds, and the handles C{submit} returned, by job.
    """
    latencies: list[float] = [0.0] * n
    handles: list[str] = [""] * n
    errors: list[BaseException] = []
    started = [0.0]
    barrier = threading.Barrier(threads, action=lambda: started.__setitem__(0, time.time()))

    def run(first):
        barrier.wait()
        try:
            for i in range(first, n, threads):
                t = time.perf_counter()
                handles[i] = submit(i)
                latencies[i] = time.perf_counter() - t
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"{len(errors)} submitting threads failed: {errors[0]!r}")
    return started[0], latencies, handles


def cpu_delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before[k], 2) for k in before}


def summary(first: float, last_finish: float, observed: float, latencies, n: int) -> dict:
    return {
        "jobs": n,
        "jobs_per_s": n / (last_finish - first),
        "seconds": last_finish - first,
        "seconds_observed": observed - first,
        "submit_p50_ms": percentile(latencies, 0.50) * 1000,
        "submit_p99_ms": percentile(latencies, 0.99) * 1000,
        "submit_max_ms": max(latencies) * 1000,
    }


class System:
    """
    One system under test, started once and measured phase by phase:
    C{submit(i)} returns a handle, C{wait(handle)} blocks until that job is
    finished, C{check(ids)} verifies that job i succeeded once with result i
    and returns the finish times as the system recorded them.
    """

    name = "?"

    def throughput(self, n: int, threads: int) -> dict:
        """N jobs from C{threads} threads: jobs/s from the first submission to the last finish."""
        base = self.finished()
        cpu_before = self.cpu()
        log.info("%s: submitting %d jobs from %d thread(s)", self.name, n, threads)
        offset = self.next_index(n)
        first, latencies, ids = submit_all(lambda i: self.submit(offset + i), n, threads)
        # Polled every 0.1 s: the rate counts from the finish times the system
        # recorded, so polling faster only adds the observer's load to the run.
        wait_for(
            lambda: self.finished() >= base + n,
            f"{self.name} jobs",
            self.procs,
            self.timeout,
            every=0.1,
        )
        observed = time.time()
        used = cpu_delta(cpu_before, self.cpu())
        done = self.check(ids, offset)
        return summary(first, max(done), observed, latencies, n) | {"cpu_s": used}

    def latency(self, n: int) -> dict:
        """One job at a time: submit, then wait until it is seen finished."""
        offset = self.next_index(n)
        log.info("%s: %d jobs one at a time (submit, then wait)", self.name, n)
        latencies, ids = [], []
        for i in range(n):
            t = time.perf_counter()
            handle = self.submit(offset + i)
            self.wait(handle)
            latencies.append(time.perf_counter() - t)
            ids.append(handle)
        self.check(ids, offset)
        return {
            "jobs": n,
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": max(latencies) * 1000,
        }

    def idle_memory(self) -> dict:
        """RSS and PSS of every process of the system, idle."""
        parts = {part: memory_mib(pids) for part, pids in self.memory_parts().items()}
        total = {
            key: sum(p[key] for p in parts.values()) for key in ("rss_mib", "pss_mib", "processes")
        }
        return total | {"parts": parts}

    _index = 0

    def next_index(self, n: int) -> int:
        """@return: the first of C{n} fresh job arguments (each job's result says which it was)."""
        first, self._index = self._index, self._index + n
        return first


# -- twistedlrp ------------------------------------------------------------------------


def lrp_command(args, state: Path, *options: str) -> list[str]:
    """@return: C{twistd lrp} for the bench site with C{options}, its state in C{state}."""
    return [
        str(BIN / "twistd"),
        "-n",
        "--pidfile=",
        "lrp",
        "--settings",
        "jobsite.settings",
        *options,
        "--state-dir",
        str(state),
        "--workers",
        str(args.workers),
        *shlex.split(args.lrp_args),
    ]


# Run in a job node's environment: submit N no-op jobs and wait for them.
_WARM_UP = """
import sys
import django
django.setup()
from jobsite.jobs import noop
from twistedlrp import jobs
for job_id in [noop.submit(-1 - i).id for i in range(int(sys.argv[1]))]:
    jobs.wait(job_id, timeout=60)
"""


# Run in a job node's environment: the blocking client's round trips, in ms.
_ROUND_TRIPS = """
import json, sys, time
import django
django.setup()
from jobsite.jobs import noop
from twistedlrp import jobs
def median(call, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1000
n = int(sys.argv[1])
job_id = noop.submit(-1).id
jobs.wait(job_id, timeout=60)
print(json.dumps({
    "get_ms": median(lambda: jobs.get(job_id), n),
    "stats_ms": median(jobs.stats, n // 4),
    "submit_ms": median(lambda: noop.submit(-2), n),
}))
"""


def job_node(args, scratch: Path, env: dict) -> dict:
    """
    @return: the idle RSS and PSS of a C{twistd lrp --jobs-only} node and its
        workers, on a database and state directory of their own, after the
        warm-up the other systems had; then (C{round_trip}) the median time
        of one C{jobs.get}, C{jobs.stats} and durable submit from another
        process (the blocking client, over the node's UNIX socket).
    """
    directory = scratch / "job-node"
    directory.mkdir()
    node_env = dict(env, LRP_BENCH_DIR=str(directory))
    migrate = [sys.executable, "-m", "django", "migrate", "--noinput", "-v0"]
    subprocess.run(migrate, cwd=HERE, env=node_env, check=True)
    state = directory / "state"
    node = start(lrp_command(args, state, "--jobs-only"), directory / "lrp.log", node_env)
    try:
        wait_for(
            (state / "jobs.sock").exists, "lrp --jobs-only start", [node], 60, error=NotStarted
        )
        warm_up = [sys.executable, "-c", _WARM_UP, str(args.warmup)]
        subprocess.run(warm_up, cwd=HERE, env=node_env, check=True, timeout=args.timeout)
        time.sleep(1.0)  # idle, as the others
        memory = memory_mib([node.pid, *descendants(node.pid)])
        trips = [sys.executable, "-c", _ROUND_TRIPS, str(args.round_trips)]
        done = subprocess.run(
            trips, cwd=HERE, env=node_env, check=True, timeout=args.timeout, capture_output=True
        )
        return memory | {"round_trip": json.loads(done.stdout)}
    finally:
        stop(node)


class Lrp(System):
    name = "lrp"

    def __init__(self, args, scratch: Path, env: dict):
        self.args, self.scratch, self.env = args, scratch, env
        self.timeout = args.timeout
        self.server = None
        self.procs = []

    def start(self) -> None:
        from jobsite.jobs import noop

        from twistedlrp import jobs

        self.jobs, self.noop = jobs, noop
        subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--noinput", "-v0"],
            cwd=HERE,
            env=self.env,
            check=True,
        )
        self.port = port = free_port()
        logfile = self.scratch / "lrp.log"
        listen = f"tcp:{port}:interface=127.0.0.1"
        self.server = start(
            lrp_command(self.args, self.scratch / "state", "--listen", listen), logfile, self.env
        )
        self.procs = [self.server]
        health = f"http://127.0.0.1:{port}/-/health"

        def healthy():
            with urllib.request.urlopen(health, timeout=1) as r:
                return r.status == 200

        wait_for(healthy, "lrp start", self.procs, 60, error=NotStarted)
        log.info("lrp: serving on %s (log %s); warming up", port, logfile)
        _, _, warm = submit_all(lambda i: noop.submit(-1 - i).id, self.args.warmup, 10)
        for job_id in warm:
            jobs.wait(job_id, timeout=60)

    def submit(self, i: int) -> str:
        return self.noop.submit(i).id

    def from_view(self, system: System, n: int) -> dict:
        """
        A view of this server submits C{n} jobs of C{system} one after the
        other (lrp's own job client, or Celery's C{delay()}), timing each.
        """
        offset = system.next_index(n)
        log.info("%s: %d jobs submitted one after the other from a view", system.name, n)
        url = f"http://127.0.0.1:{self.port}/submit-many?system={system.name}&first={offset}&n={n}"
        with urllib.request.urlopen(url, timeout=self.timeout) as r:
            body = json.loads(r.read())
        for handle in body["ids"]:
            system.wait(handle)
        system.check(body["ids"], offset)
        latencies = body["latencies"]
        return {
            "jobs": n,
            "submit_p50_ms": percentile(latencies, 0.50) * 1000,
            "submit_p99_ms": percentile(latencies, 0.99) * 1000,
        }

    def wait(self, job_id: str) -> None:
        self.jobs.wait(job_id, timeout=60)

    def finished(self) -> int:
        counts = self.jobs.stats()["jobs"]
        return sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))

    def cpu(self) -> dict:
        server_cpu, workers_cpu = session_cpu(self.server.pid)
        return {"server": server_cpu, "workers": workers_cpu, "client": client_cpu()}

    def memory_parts(self) -> dict:
        children = descendants(self.server.pid)
        # The worker template is the server's child; the workers it forked
        # (its children) share its command line.
        template = [
            pid
            for pid in children
            if b"--template" in _cmdline(pid)
            and (_stat(pid) or ["", ""])[1] == str(self.server.pid)
        ]
        parts = {"server": [self.server.pid], "workers": [p for p in children if p not in template]}
        if template:
            parts["worker template"] = template
        return parts

    def check(self, ids: list[str], offset: int) -> list[float]:
        from django.db import connections

        from twistedlrp.models import Job

        rows = {
            str(row[0]): row[1:]
            for row in Job.objects.filter(id__in=ids).values_list(
                "id", "state", "attempts", "result", "finished_at"
            )
        }
        connections.close_all()
        bad = [
            (i, rows.get(job_id))
            for i, job_id in enumerate(ids)
            if rows.get(job_id, (None,))[:3] != ("succeeded", 1, offset + i)
        ]
        if bad or len(set(ids)) != len(ids):
            raise RuntimeError(
                f"lrp: not every job succeeded exactly once: {len(bad)} bad rows, e.g. {bad[:3]}"
            )
        return [row[3].timestamp() for row in rows.values()]

    def totals(self) -> dict:
        return self.jobs.stats()["counters"]

    def stop(self) -> None:
        stop(self.server)


# -- Celery ----------------------------------------------------------------------------


def celery_missing() -> str | None:
    if not shutil.which("redis-server"):
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    if not (BIN / "celery").exists():
        return "celery is not installed (pip install celery redis, or make bench-jobs)"
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install celery redis, or make bench-jobs)"
    return None


class Celery(System):
    name = "celery"

    def __init__(self, args, scratch: Path, env: dict, redis_port: int):
        self.args, self.scratch, self.env, self.redis_port = args, scratch, env, redis_port
        self.timeout = args.timeout
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        import redis
        from jobsite.celery_app import app, noop

        self.app, self.noop = app, noop
        scratch = self.scratch
        self.procs.append(
            start(
                [
                    shutil.which("redis-server"),
                    "--port",
                    str(self.redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(scratch),
                    "--loglevel",
                    "warning",
                ],
                scratch / "redis.log",
                self.env,
            )
        )
        self.results = redis.Redis(port=self.redis_port, db=1)
        wait_for(self.results.ping, "redis-server start", self.procs, 30, error=NotStarted)
        self.procs.append(
            start(
                [
                    str(BIN / "celery"),
                    "-A",
                    "jobsite.celery_app",
                    "worker",
                    "--pool",
                    "prefork",
                    "--concurrency",
                    str(self.args.workers),
                    "--hostname",
                    "bench@%h",
                    "--loglevel",
                    "WARNING",
                ],
                scratch / "celery.log",
                self.env,
            )
        )
        wait_for(
            lambda: app.control.ping(timeout=0.5),
            "celery worker start",
            self.procs,
            60,
            0.2,
            NotStarted,
        )
        log.info("celery: worker up (log %s); warming up", scratch / "celery.log")
        _, _, warm = submit_all(lambda i: noop.delay(-1 - i).id, self.args.warmup, 10)
        for task_id in warm:
            noop.AsyncResult(task_id).get(timeout=60)
        self._processed = self.processed()

    def submit(self, i: int) -> str:
        return self.noop.delay(i).id

    def wait(self, task_id: str) -> None:
        self.noop.AsyncResult(task_id).get(timeout=60)

    def finished(self) -> int:
        return self.results.dbsize()

    def processed(self) -> int:
        stats = self.app.control.inspect(timeout=2).stats() or {}
        return sum(s["total"].get(self.noop.name, 0) for s in stats.values())

    def cpu(self) -> dict:
        redis_server, worker = self.procs
        main, children = session_cpu(worker.pid)
        return {
            "worker": main,
            "pool": children,
            "redis": sum(session_cpu(redis_server.pid)),
            "client": client_cpu(),
        }

    def memory_parts(self) -> dict:
        redis_server, worker = self.procs
        return {
            "worker": [worker.pid, *descendants(worker.pid)],
            "redis": [redis_server.pid],
        }

    def check(self, ids: list[str], offset: int) -> list[float]:
        metas = self.results.mget([f"celery-task-meta-{task_id}" for task_id in ids])
        bad, done = [], []
        for i, raw in enumerate(metas):
            meta = json.loads(raw) if raw else {}
            if meta.get("status") != "SUCCESS" or meta.get("result") != offset + i:
                bad.append((i, meta))
                continue
            when = datetime.fromisoformat(meta["date_done"])
            done.append((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())
        if bad or len(set(ids)) != len(ids):
            raise RuntimeError(
                f"celery: not every task succeeded: {len(bad)} bad results, e.g. {bad[:3]}"
            )
        return done

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


# -- main ------------------------------------------------------------------------------


def ratio(value, base, higher_is_better: bool) -> str:
    if not base or not value:
        return "-"
    return f"{value / base if higher_is_better else base / value:.2f}x"


def table(results: dict, args) -> list[str]:
    names = list(results)
    celery = results.get("celery")
    rows = [
        ("many", "jobs_per_s", f"jobs/s, {args.jobs} jobs from {args.threads} threads", True),
        ("single", "jobs_per_s", f"jobs/s, {args.single_jobs} jobs from 1 thread", True),
        ("latency", "p50_ms", f"submit->finished p50 ms, {args.latency_jobs} one at a time", False),
        ("latency", "p99_ms", "submit->finished p99 ms", False),
        ("view", "submit_p50_ms", f"submit from a view p50 ms, {args.view_jobs} in a row", False),
        ("view", "submit_p99_ms", "submit from a view p99 ms", False),
        ("memory", "rss_mib", "idle RSS MiB (all processes)", False),
        ("memory", "pss_mib", "idle PSS MiB (all processes)", False),
        ("node_memory", "rss_mib", "idle RSS MiB, lrp --jobs-only (no HTTP)", False),
        ("node_memory", "pss_mib", "idle PSS MiB, lrp --jobs-only (no HTTP)", False),
        ("memory_after", "rss_mib", "idle RSS MiB after the phases", False),
        ("memory_after", "pss_mib", "idle PSS MiB after the phases", False),
        ("round_trip", "get_ms", "jobs.get round trip ms, --jobs-only node", False),
        ("round_trip", "stats_ms", "jobs.stats round trip ms", False),
        ("round_trip", "submit_ms", "durable submit round trip ms", False),
    ]
    width = 48
    lines = [
        f"# no-op jobs, {args.workers} worker processes each, Python {sys.version.split()[0]}; "
        "ratios: lrp's advantage (>1 is better for lrp)",
        f"  {'measure':<{width}}" + "".join(f" {n:>10}" for n in names) + f" {'lrp/celery':>11}",
    ]
    for phase, key, label, higher in rows:
        # Celery's side has no HTTP either way: its row is its one memory.
        theirs = "memory" if phase == "node_memory" else phase
        values = [results[n].get(phase if n == "lrp" else theirs, {}).get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = "".join(
            f" {'-':>10}" if v is None else f" {v:>10.{2 if v < 10 else 1}f}" for v in values
        )
        r = "-"
        if celery and "lrp" in results:
            r = ratio(
                results["lrp"].get(phase, {}).get(key), celery.get(theirs, {}).get(key), higher
            )
        lines.append(f"  {label:<{width}}{cells} {r:>11}")
    for name, r in results.items():
        for phase in ("many", "single"):
            if phase in r:
                p = r[phase]
                lines.append(
                    f"  {name} {phase}: first submit to last finish {p['seconds']:.2f} s, submit "
                    f"p50 {p['submit_p50_ms']:.2f} ms p99 {p['submit_p99_ms']:.2f} ms; CPU s "
                    + ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_s"].items())
                )
        for phase, when in (("memory", ""), ("memory_after", " after the phases")):
            if phase in r:
                lines.append(
                    f"  {name} idle memory{when}: "
                    + "; ".join(
                        f"{part} ({m['processes']} process(es)) RSS {m['rss_mib']:.0f} MiB, "
                        f"PSS {m['pss_mib']:.0f} MiB"
                        for part, m in r[phase]["parts"].items()
                    )
                )
    lines.append("  every job of every phase succeeded once, with its own result")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs of the many-threads phase")
    parser.add_argument("--threads", type=int, default=10, help="submitting threads")
    parser.add_argument(
        "--single-jobs", type=int, default=1000, help="jobs of the one-thread phase (0: skip)"
    )
    parser.add_argument(
        "--latency-jobs", type=int, default=300, help="jobs run one at a time (0: skip)"
    )
    parser.add_argument(
        "--view-jobs",
        type=int,
        default=300,
        help="jobs a view in lrp's server submits one after another, per system (0: skip)",
    )
    parser.add_argument(
        "--round-trips", type=int, default=1000, help="jobs.get and submits timed one by one"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes per system")
    parser.add_argument(
        "--warmup", type=int, default=100, help="jobs submitted and run before measuring"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for all jobs")
    parser.add_argument("--systems", default="lrp,celery")
    parser.add_argument(
        "--lrp-args", default="", help="more options for twistd lrp ('--max-jobs-per-worker 5000')"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)

    scratch = Path(tempfile.mkdtemp(prefix="lrp-bench-jobs-"))
    redis_port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        DJANGO_SETTINGS_MODULE="jobsite.settings",
        LRP_BENCH_DIR=str(scratch),
        LRP_BENCH_REDIS=f"redis://127.0.0.1:{redis_port}",
    )
    os.environ.update(
        {k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "LRP_BENCH_DIR", "LRP_BENCH_REDIS")}
    )
    sys.path.insert(0, str(HERE))
    import django

    django.setup()

    systems: list[System] = []
    for name in args.systems.split(","):
        if name == "lrp":
            systems.append(Lrp(args, scratch, env))
        elif name == "celery":
            missing = celery_missing()
            if missing:
                sys.stderr.write(f"bench: Celery skipped: {missing}\n")
                continue
            systems.append(Celery(args, scratch, env, redis_port))
        else:
            parser.error(f"--systems: unknown system {name!r} (lrp, celery)")
    results: dict = {}
    running: list[System] = []
    try:
        for system in systems:
            try:
                system.start()
            except NotStarted as e:
                if system.name == "lrp":
                    raise
                sys.stderr.write(f"bench: Celery skipped: it did not start: {e}\n")
                system.stop()
                continue
            running.append(system)
            results[system.name] = {}
        time.sleep(1.0)  # idle: let start-up and warm-up settle
        for system in running:
            results[system.name]["memory"] = system.idle_memory()
        if "lrp" in results:
            node = job_node(args, scratch, env)
            results["lrp"]["round_trip"] = node.pop("round_trip")
            results["lrp"]["node_memory"] = node
        # Phase by phase, the systems one after the other, so that both see
        # the same machine (other load on it comes and goes).
        for system in running:
            results[system.name]["many"] = system.throughput(args.jobs, args.threads)
        if args.single_jobs:
            for system in running:
                results[system.name]["single"] = system.throughput(args.single_jobs, 1)
        if args.latency_jobs:
            for system in running:
                results[system.name]["latency"] = system.latency(args.latency_jobs)
        server = next((s for s in running if s.name == "lrp"), None)
        if args.view_jobs and server is not None:
            for system in running:
                results[system.name]["view"] = server.from_view(system, args.view_jobs)
        time.sleep(1.0)
        for system in running:
            # After the phases: lrp's workers have been replaced (and its
            # worker template started) with default options.
            results[system.name]["memory_after"] = system.idle_memory()
    finally:
        for system in reversed(running):
            system.stop()
        if args.keep:
            log.info("scratch directory kept: %s", scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return report(table(results, args), results, args.json)


if __name__ == "__main__":
    sys.exit(main())
