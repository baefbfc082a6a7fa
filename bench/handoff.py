"""
Where one lrp process's CPU goes per request, part by part: serve the bench
site with `twistd lrp` (one process) whose request path is wrapped in CPU
timers (`time.thread_time_ns`, so a thread waiting for the GIL or a lock
counts nothing), load one path with wrk, and print each part's CPU and wall
time per request, and how often it ran per request.

    .venv/bin/python bench/handoff.py --seconds 8 --path /hello

The timers cost about a microsecond per wrapped call; the server's whole
CPU per request (from /proc, as `make bench` reads it, timers included) is
printed below the parts.
docs/performance.md ("Where a request's CPU goes") has the numbers.
"""

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import bench_site, free_port, thread_cpu

HERE = Path(__file__).resolve().parent

# (module, class or None, function, label): what is timed, in the server.
PARTS = [
    (
        "twistedlrp.web.http.protocol",
        "HTTPConnection",
        "dataReceived",
        "reactor: request in (parse, route, render)",
    ),
    (
        "twistedlrp.web.wsgi",
        "WSGIResource",
        "render",
        "reactor:   of which render (environ, submit)",
    ),
    ("twistedlrp.web.wsgi", None, "build_environ", "reactor:     of which build_environ"),
    ("twistedlrp.web.pool", "ThreadPool", "submit", "reactor:     of which pool.submit"),
    (
        "twistedlrp.web.wsgi",
        "_WSGIResponse",
        "_deliver",
        "reactor: _deliver (head, body, send, log)",
    ),
    ("twisted.internet._signals", "_UnixWaker", "doRead", "reactor: waker read"),
    ("twisted.internet._signals", "_UnixWaker", "wakeUp", "pool: waker write"),
    ("twistedlrp.web.wsgi", "_WSGIResponse", "run", "pool: run() (application, response, reply)"),
    ("twistedlrp.web.pool", "Replies", "callFromThread", "pool:   of which the reply"),
    (
        "django.http.response",
        "HttpResponseBase",
        "close",
        "pool:   of which the response's close()",
    ),
]


def _instrument(out: str) -> None:
    """In the server process: wrap L{PARTS} in timers, write their totals at exit."""
    import atexit
    import importlib

    cpu: dict = collections.Counter()
    wall: dict = collections.Counter()
    calls: dict = collections.Counter()

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                cpu[label] += time.thread_time_ns() - c0
                wall[label] += time.perf_counter_ns() - w0
                calls[label] += 1

        return wrapper

    for module, cls, name, label in PARTS:
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        owner = getattr(owner, cls, None) if cls else owner
        if owner is not None and hasattr(owner, name):
            setattr(owner, name, timed(getattr(owner, name), label))
    # What the application call itself costs, in its thread.
    from twistedlrp.web import wsgi

    init = wsgi._WSGIResponse.__init__

    def timed_init(self, reactor, request, application, *args, **kwargs):
        application = timed(application, "pool:   of which the application call")
        init(self, reactor, request, application, *args, **kwargs)

    wsgi._WSGIResponse.__init__ = timed_init
    atexit.register(
        lambda: Path(out).write_text(json.dumps({"cpu": cpu, "wall": wall, "calls": calls}))
    )


def _wrk(url: str, seconds: int) -> int:
    """@return: the requests wrk had answered in C{seconds}."""
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", "32", "-d", f"{seconds}s", url], capture_output=True, text=True
    ).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--threads", type=int, default=20)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lrp-handoff-"))
    env = bench_site(scratch)
    port, totals = free_port(), scratch / "totals.json"
    listen = f"tcp:{port}:interface=127.0.0.1:backlog=2048"
    twistd = [
        *("-n", "--pidfile=", "lrp", "--settings", "benchsite.settings", "--listen", listen),
        *("--threads", str(args.threads), "--no-jobs", "--max-waiting", "10000"),
    ]
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(totals), *twistd],
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}{args.path}"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["curl", "-sf", "-o", "/dev/null", url]).returncode != 0:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        _wrk(url, 2)  # warm-up, counted in the parts' totals too
        before = thread_cpu(server.pid)
        measured = _wrk(url, args.seconds)
        after = thread_cpu(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    parts = json.loads(totals.read_text())
    requests = parts["calls"]["reactor: _deliver (head, body, send, log)"]
    print(f"# {args.path}, {requests} requests timed, lrp-1, {args.threads} threads")
    print(f"  {'part':<46} {'CPU µs/req':>10} {'wall µs/req':>11} {'calls/req':>9}")
    for _, _, _, label in [*PARTS, (0, 0, 0, "pool:   of which the application call")]:
        if label in parts["calls"]:
            cpu, wall = (
                parts["cpu"][label] / requests / 1000,
                parts["wall"][label] / requests / 1000,
            )
            calls = parts["calls"][label] / requests
            print(f"  {label:<46} {cpu:>10.1f} {wall:>11.1f} {calls:>9.2f}")
    print(f"  whole server, /proc, {measured} requests:")
    for kind, name in (("main", "reactor thread"), ("threads", "pool threads"), ("total", "all")):
        print(f"    {name:<44} {(after[kind] - before[kind]) / measured * 1e6:>10.0f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _instrument(sys.argv[2])
        from twisted.scripts.twistd import run

        sys.argv = ["twistd", *sys.argv[3:]]
        run()
    else:
        sys.exit(main())
