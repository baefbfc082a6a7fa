"""
Run the same no-op job through twistedlrp's job service and through Celery
with Redis in the same run, and report end-to-end jobs/s, submit latency
and the ratio to Celery.

    make bench-jobs                    # installs celery and redis (the client) first
    .venv/bin/python bench/jobs.py --jobs 500 --systems lrp

Both systems serve `bench/jobsite` (SQLite in a fresh temporary directory)
with two worker processes each: `twistd -n lrp --workers 2` (job service in
the server, migrated first), and `celery worker --pool prefork --concurrency
2` with a throwaway redis-server (no persistence) as broker and result
backend. This process submits N jobs from T threads (`noop.submit(i)`
through the server's UNIX socket; `noop.delay(i)`), times every submission,
waits until all are finished, and checks that every job succeeded once with
its own result. jobs/s counts from the first submission to the last finish
as the system recorded it (`finished_at`; Celery's `date_done`); a last
line gives the CPU seconds each side's processes used meanwhile (from
/proc). Both run with their defaults otherwise: lrp replaces a worker after
1000 jobs (`--max-jobs-per-worker`; `--lrp-args` passes options), Celery's
prefork children live on. Celery is skipped, with a message, when
redis-server (Debian: apt-get install redis-server) or the celery and redis
packages are missing, or when it does not start.
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

from _shared import free_port, report

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
        rest of its session: live members plus the children it has reaped.
    """
    tick = os.sysconf("SC_CLK_TCK")
    own = others = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if int(fields[3]) != leader:  # the session id
            continue
        utime, stime, cutime, cstime = (int(f) / tick for f in fields[11:15])
        if pid == leader:
            own, others = own + utime + stime, others + cutime + cstime
        else:
            others += utime + stime + cutime + cstime
    return own, others


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


# -- twistedlrp ------------------------------------------------------------------------


def bench_lrp(args, scratch: Path, env: dict) -> dict:
    from django.db import connections
    from jobsite.jobs import noop

    from twistedlrp import jobs
    from twistedlrp.models import Job

    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput", "-v0"],
        cwd=HERE,
        env=env,
        check=True,
    )
    port = free_port()
    logfile = scratch / "lrp.log"
    server = None
    try:
        server = start(
            [
                str(BIN / "twistd"),
                "-n",
                "--pidfile=",
                "lrp",
                "--settings",
                "jobsite.settings",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--state-dir",
                str(scratch / "state"),
                "--workers",
                str(args.workers),
                *shlex.split(args.lrp_args),
            ],
            logfile,
            env,
        )
        health = f"http://127.0.0.1:{port}/-/health"

        def healthy():
            with urllib.request.urlopen(health, timeout=1) as r:
                return r.status == 200

        wait_for(healthy, "lrp start", [server], 60, error=NotStarted)
        log.info("lrp: serving on %s (log %s); warming up", port, logfile)
        _, _, warm = submit_all(lambda i: noop.submit(-1 - i).id, args.warmup, args.threads)
        for job_id in warm:
            jobs.wait(job_id, timeout=60)
        before = jobs.stats()["counters"]

        def finished():
            counts = jobs.stats()["jobs"]
            return sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))

        base = finished()

        def cpu():
            server_cpu, workers_cpu = session_cpu(server.pid)
            return {"server": server_cpu, "workers": workers_cpu, "client": client_cpu()}

        cpu_before = cpu()
        log.info("lrp: submitting %d jobs from %d threads", args.jobs, args.threads)
        first, latencies, ids = submit_all(lambda i: noop.submit(i).id, args.jobs, args.threads)
        log.info("lrp: submitted in %.2f s; waiting", time.time() - first)
        wait_for(lambda: finished() >= base + args.jobs, "lrp jobs", [server], args.timeout)
        observed = time.time()
        used = cpu_delta(cpu_before, cpu())
        after = jobs.stats()["counters"]

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
            if rows.get(job_id, (None,))[:3] != ("succeeded", 1, i)
        ]
        ran = {k: after.get(k, 0) - before.get(k, 0) for k in ("succeeded", "failed", "retried")}
        expected = {"succeeded": args.jobs, "failed": 0, "retried": 0}
        if bad or len(set(ids)) != args.jobs or ran != expected:
            raise RuntimeError(
                f"lrp: not every job succeeded exactly once: counters {ran}, "
                f"{len(bad)} bad rows, e.g. {bad[:3]}"
            )
        last = max(row[3] for row in rows.values()).timestamp()
        return summary(first, last, observed, latencies, args.jobs) | {"check": ran, "cpu_s": used}
    finally:
        stop(server)


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


def bench_celery(args, scratch: Path, env: dict, redis_port: int) -> dict:
    import redis
    from jobsite.celery_app import app, noop

    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            start(
                [
                    shutil.which("redis-server"),
                    "--port",
                    str(redis_port),
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
                env,
            )
        )
        results = redis.Redis(port=redis_port, db=1)
        wait_for(results.ping, "redis-server start", procs, 30, error=NotStarted)
        procs.append(
            start(
                [
                    str(BIN / "celery"),
                    "-A",
                    "jobsite.celery_app",
                    "worker",
                    "--pool",
                    "prefork",
                    "--concurrency",
                    str(args.workers),
                    "--hostname",
                    "bench@%h",
                    "--loglevel",
                    "WARNING",
                ],
                scratch / "celery.log",
                env,
            )
        )
        wait_for(
            lambda: app.control.ping(timeout=0.5), "celery worker start", procs, 60, 0.2, NotStarted
        )
        log.info("celery: worker up (log %s); warming up", scratch / "celery.log")
        _, _, warm = submit_all(lambda i: noop.delay(-1 - i).id, args.warmup, args.threads)
        for task_id in warm:
            noop.AsyncResult(task_id).get(timeout=60)

        def processed():
            stats = app.control.inspect(timeout=2).stats() or {}
            return sum(s["total"].get(noop.name, 0) for s in stats.values())

        before = processed()
        base = results.dbsize()
        redis_server, worker = procs

        def cpu():
            main, children = session_cpu(worker.pid)
            return {
                "worker": main,
                "pool": children,
                "redis": sum(session_cpu(redis_server.pid)),
                "client": client_cpu(),
            }

        cpu_before = cpu()
        log.info("celery: submitting %d jobs from %d threads", args.jobs, args.threads)
        first, latencies, ids = submit_all(lambda i: noop.delay(i).id, args.jobs, args.threads)
        log.info("celery: submitted in %.2f s; waiting", time.time() - first)
        wait_for(lambda: results.dbsize() >= base + args.jobs, "celery jobs", procs, args.timeout)
        observed = time.time()
        used = cpu_delta(cpu_before, cpu())
        ran = processed() - before

        metas = results.mget([f"celery-task-meta-{task_id}" for task_id in ids])
        bad, done = [], []
        for i, raw in enumerate(metas):
            meta = json.loads(raw) if raw else {}
            if meta.get("status") != "SUCCESS" or meta.get("result") != i:
                bad.append((i, meta))
                continue
            when = datetime.fromisoformat(meta["date_done"])
            done.append((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())
        if bad or len(set(ids)) != args.jobs or ran != args.jobs:
            raise RuntimeError(
                f"celery: not every task succeeded exactly once: the worker ran {ran}, "
                f"{len(bad)} bad results, e.g. {bad[:3]}"
            )
        return summary(first, max(done), observed, latencies, args.jobs) | {
            "check": {"succeeded": ran},
            "cpu_s": used,
        }
    finally:
        for proc in reversed(procs):
            stop(proc)


# -- main ------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per system")
    parser.add_argument("--threads", type=int, default=10, help="submitting threads")
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
        PYTHONPATH=str(HERE),
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

    results: dict = {}
    try:
        for name in args.systems.split(","):
            if name == "lrp":
                results["lrp"] = bench_lrp(args, scratch, env)
            elif name == "celery":
                missing = celery_missing()
                if missing:
                    sys.stderr.write(f"bench: Celery skipped: {missing}\n")
                    continue
                try:
                    results["celery"] = bench_celery(args, scratch, env, redis_port)
                except NotStarted as e:
                    sys.stderr.write(f"bench: Celery skipped: it did not start: {e}\n")
            else:
                parser.error(f"--systems: unknown system {name!r} (lrp, celery)")
    finally:
        if args.keep:
            log.info("scratch directory kept: %s", scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    base = results.get("celery", {}).get("jobs_per_s")
    lines = [
        f"# {args.jobs} no-op jobs from {args.threads} threads, {args.workers} worker "
        f"processes each, Python {sys.version.split()[0]}",
        f"  {'system':<8} {'jobs/s':>8} {'submit p50 ms':>14} {'submit p99 ms':>14} "
        f"{'vs celery':>10}",
    ]
    for name, r in results.items():
        ratio = f"{r['jobs_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"  {name:<8} {r['jobs_per_s']:>8.0f} {r['submit_p50_ms']:>14.2f} "
            f"{r['submit_p99_ms']:>14.2f} {ratio:>10}"
        )
    for name, r in results.items():
        lines.append(
            f"  {name}: first submit to last finish {r['seconds']:.2f} s (seen done after "
            f"{r['seconds_observed']:.2f} s), slowest submit {r['submit_max_ms']:.1f} ms, "
            f"each of {r['jobs']} jobs succeeded once"
        )
        lines.append(
            f"  {name} CPU s while measured: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items())
        )
    return report(lines, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
