"""
Serve the same Django site with twistedlrp and its peers, load each with wrk,
and report requests/s, latency, CPU per request and lrp's ratio to each peer
(issue 20's targets), over several rounds that alternate the servers' order,
as medians.

    make bench                         # 5 rounds of the target servers
    .venv/bin/python bench/run.py --rounds 3 --seconds 5 --servers lrp-2,gunicorn-2

Each server runs with one process and with two (`lrp --web-workers 2`,
gunicorn and granian `--workers 2`; `twistd web` has one), every process
with the same thread count: by default the pool `twistd web --wsgi` always
runs (Twisted's `ThreadPool` maximum, 20), which it has no option to
change. `bare-1` and `bare-2` are bench/bare.py: a bare Twisted protocol
with httptools and lrp's thread pool, no limits, no logging, which is the
most any server built on a Twisted reactor and a thread pool can serve.
The paths: `/hello` (a few bytes: the server's own cost), `/page` (a
template of 20 rows from SQLite: what a site sees) and `/io` (a view that
waits 10 ms). CPU per request is read from /proc for the server's
processes (main threads, which are lrp's reactors, and the others, its
pool) over each measured run. wrk must be installed (Debian: apt-get
install wrk); gunicorn, granian and matplotlib (for the PNG
chart) come with the bench extra (pip install -e '.[bench]'); a server
that is missing is skipped.
"""

import argparse
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _shared import bench_site, free_port, report, thread_cpu

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
RESULTS = HERE / "results"


def _twisted_web_threads() -> int:
    """@return: the size of the thread pool C{twistd web --wsgi} serves from."""
    from twisted.python.threadpool import ThreadPool

    return ThreadPool.max


def servers(port: int, threads: int) -> dict[str, list[str]]:
    """@return: the command of each server, by name; a C{-2} name runs two processes."""
    listen = f"tcp:{port}:interface=127.0.0.1:backlog=2048"
    commands = {}
    for processes in (1, 2):
        commands[f"lrp-{processes}"] = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "lrp",
            "--settings",
            "benchsite.settings",
            "--listen",
            listen,
            "--threads",
            str(threads),
            "--no-jobs",
            "--max-waiting",
            "10000",
        ] + (["--web-workers", str(processes)] if processes > 1 else [])
        commands[f"gunicorn-{processes}"] = [
            str(BIN / "gunicorn"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(processes),
            "--threads",
            str(threads),
            "--worker-class",
            "gthread",
            "--log-level",
            "warning",
            "benchsite.wsgi:application",
        ]
        commands[f"granian-{processes}"] = [
            str(BIN / "granian"),
            "--interface",
            "wsgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(processes),
            "--blocking-threads",
            str(threads),
            "--log-level",
            "warning",
            "benchsite.wsgi:application",
        ]
        commands[f"bare-{processes}"] = [
            sys.executable,
            str(HERE / "bare.py"),
            "--port",
            str(port),
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "benchsite.wsgi",
        ]
    commands["twisted-web"] = [
        str(BIN / "twistd"),
        "-n",
        "--pidfile=",
        "web",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--wsgi",
        "benchsite.wsgi.application",
    ]
    return commands


ALL_SERVERS = "lrp-1,lrp-2,twisted-web,gunicorn-1,gunicorn-2,granian-1,granian-2,bare-1,bare-2"
# The servers of issue 20's targets: what make bench runs.
TARGET_SERVERS = "lrp-1,granian-1,lrp-2,granian-2,gunicorn-2"


def wait_until_serving(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """
    Wait until the server answers C{/hello} (a port that accepts is not
    enough: lrp's main process listens before its web processes run).

    @raise RuntimeError: if it exits, or does not answer within C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/hello")
            if connection.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
        finally:
            connection.close()
    raise RuntimeError("server did not answer /hello")


def connection_split(port: int) -> str:
    """
    @return: how the established connections to C{port} fall between the
        server's processes, most first (C{"17/15"}), or C{""} if C{ss}
        cannot say.
    """
    if not shutil.which("ss"):
        return ""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    counts = Counter(re.findall(r"pid=(\d+)", out))
    return "/".join(str(n) for n in sorted(counts.values(), reverse=True))


def wrk(url: str, seconds: int, connections: int, port: int | None = None, pid=None) -> dict:
    """
    Load C{url} with wrk; with C{port}, also count how the connections fall
    between the server's processes halfway through; with C{pid}, the CPU
    its processes used per request (microseconds).
    """
    before = thread_cpu(pid) if pid else None
    proc = subprocess.Popen(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    split = ""
    if port is not None:
        time.sleep(seconds / 2)
        split = connection_split(port)
    out, _ = proc.communicate(timeout=seconds + 60)
    after = thread_cpu(pid) if pid else None
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)

    def ms(match):
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    result = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "split": split,
    }
    if before and requests:
        for kind in ("main", "threads", "total"):
            result[f"cpu_{kind}_us"] = round((after[kind] - before[kind]) / requests * 1e6)
    return result


def serve_and_load(command: list[str], args, env: dict) -> dict:
    """Start one server, load each path (after a warm-up), stop it. @return: results by path."""
    proc = subprocess.Popen(
        command,
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results = {}
    try:
        wait_until_serving(args.port, proc)
        for path in args.paths.split(","):
            url = f"http://127.0.0.1:{args.port}{path}"
            wrk(url, args.warmup, args.connections)
            results[path] = wrk(url, args.seconds, args.connections, args.port, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return results


# lrp's ratio to a peer, issue 20's target for it, and whether every round
# must reach it (else the median).
TARGETS = [
    ("lrp-1", "granian-1", 1.0, False),
    ("lrp-2", "granian-2", 0.9, False),
    ("lrp-2", "gunicorn-2", 1.3, True),
    ("lrp-2", "bare-2", None, False),
]
# Issue 20's target for lrp's CPU per request (reactor + pool), microseconds.
CPU_TARGET_US = 300


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(rounds: list[dict]) -> tuple[dict, dict]:
    """
    @return: the median of each server's numbers on each path, and each
        target's ratio in every round (rounds where both servers ran).
    """
    medians: dict = {}
    ratios: dict = {}
    for path in dict.fromkeys(p for r in rounds for p in r):
        names = dict.fromkeys(n for r in rounds for n in r.get(path, {}))
        for name in names:
            runs = [r[path][name] for r in rounds if name in r.get(path, {})]
            medians.setdefault(path, {})[name] = {
                key: round(median([run[key] for run in runs]), 2)
                for key in runs[0]
                if isinstance(runs[0][key], int | float)
            } | {"split": runs[-1]["split"], "rounds": len(runs)}
        for ours, peer, _, _ in TARGETS:
            values = [
                round(r[path][ours]["rps"] / r[path][peer]["rps"], 3)
                for r in rounds
                if ours in r.get(path, {}) and peer in r.get(path, {})
            ]
            if values:
                ratios.setdefault(path, {})[f"{ours} / {peer}"] = values
    return medians, ratios


def table(args, medians: dict, ratios: dict) -> list[str]:
    """@return: the report's lines: each server's medians, then lrp's ratios against the targets."""
    lines = [
        f"# {args.rounds} rounds (order alternated), medians; {args.connections} connections, "
        f"{args.threads} threads per process, {args.seconds} s per run, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}"
    ]
    for path, by_server in medians.items():
        lines.append(f"\n{path}")
        lines.append(
            f"  {'server':<12} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>11}"
            f" {'(main':>6} {'+ others)':>9} {'connections':>12}"
        )
        for name, r in by_server.items():
            note = f"  ({r['non_2xx']:.0f} non-2xx)" if r.get("non_2xx") else ""
            cpu = " ".join(
                f"{r[key]:>{width}.0f}" if key in r else f"{'-':>{width}}"
                for key, width in (("cpu_total_us", 11), ("cpu_main_us", 6), ("cpu_threads_us", 9))
            )
            lines.append(
                f"  {name:<12} {r['rps']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {cpu}"
                f" {r.get('split', ''):>12}{note}"
            )
        for ours, peer, target, every in TARGETS:
            values = ratios.get(path, {}).get(f"{ours} / {peer}")
            if not values:
                continue
            mid = median(values)
            goal = ""
            if target is not None:
                met = (min(values) if every else mid) >= target
                goal = f"  target {'every round ' if every else ''}≥ {target}: {'met' if met else 'NOT met'}"
            each = " ".join(f"{v:.2f}" for v in values)
            lines.append(f"  {ours} / {peer}: median {mid:.2f}x  (rounds: {each}){goal}")
        for name in ("lrp-1", "lrp-2"):
            cpu = by_server.get(name, {}).get("cpu_total_us")
            if cpu is not None and path == "/hello":
                met = "met" if cpu <= CPU_TARGET_US else "NOT met"
                lines.append(
                    f"  {name} CPU per request: {cpu:.0f} µs, target ≤ {CPU_TARGET_US}: {met}"
                )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=_twisted_web_threads())
    parser.add_argument(
        "--servers", default=TARGET_SERVERS, help=f"comma-separated, or 'all' ({ALL_SERVERS})"
    )
    parser.add_argument("--paths", default="/hello,/page,/io")
    parser.add_argument("--json", default=str(RESULTS / "http.json"), help="'' for none")
    parser.add_argument("--chart", default=str(RESULTS / "http.png"), help="'' for none")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.stderr.write("bench: wrk is not installed (Debian: apt-get install wrk)\n")
        return 2
    names = (ALL_SERVERS if args.servers == "all" else args.servers).split(",")
    scratch = Path(tempfile.mkdtemp(prefix="lrp-bench-"))
    env = bench_site(scratch)
    rounds: list[dict] = []
    try:
        for number in range(args.rounds):
            this_round: dict = {}
            # Reversed every other round: no server always runs first or last.
            for name in names if number % 2 == 0 else names[::-1]:
                args.port = free_port()
                command = servers(args.port, args.threads)[name]
                if not Path(command[0]).exists():
                    if number == 0:
                        sys.stderr.write(f"bench: {name} is not installed, skipped\n")
                    continue
                for path, result in serve_and_load(command, args, env).items():
                    this_round.setdefault(path, {})[name] = result
            rounds.append(this_round)
            sys.stderr.write(f"bench: round {number + 1} of {args.rounds} done\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians, ratios = summarise(rounds)
    lines = table(args, medians, ratios)
    if args.chart and medians:
        drawn = chart(medians, args.chart, lines[0])
        # Relative to the checkout: the results are committed.
        drawn = drawn.replace(str(HERE.parent) + "/", "")
        lines.append(f"\nchart: {drawn}")
    if args.json:
        Path(args.json).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    results = {"medians": medians, "ratios": ratios, "rounds": rounds, "title": lines[0]}
    return report(lines, results, args.json)


def chart(results: dict, path: str, title: str) -> str:
    """
    Draw requests/s per server and path as grouped bars, with each bar's p99.

    @return: the PNG's path, or why there is none (matplotlib is the bench extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install -e '.[bench]')"
    paths = list(results)
    names = list(dict.fromkeys(name for by_server in results.values() for name in by_server))
    figure, axes = plt.subplots(figsize=(2 + 1.6 * len(names), 4.5))
    width = 0.8 / len(paths)
    for i, url_path in enumerate(paths):
        values = [results[url_path].get(name, {}).get("rps", 0) for name in names]
        bars = axes.bar([x + i * width for x in range(len(names))], values, width, label=url_path)
        for bar, name in zip(bars, names, strict=True):
            p99 = results[url_path].get(name, {}).get("p99_ms")
            if p99 is not None:
                axes.annotate(
                    f"p99 {p99:.0f} ms",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    axes.set_xticks([x + width * (len(paths) - 1) / 2 for x in range(len(names))], names)
    axes.set_ylabel("requests/s")
    axes.set_title(title.lstrip("# "), fontsize=8)
    axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    sys.exit(main())
