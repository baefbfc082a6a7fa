"""
Serve the same Django site with twistedlrp and its peers, load each with wrk
in the same run, and report requests/s, latency, the ratio to
`twistd web --wsgi`, and how wrk's connections fell between a server's
processes (counted with `ss` halfway through each run).

    make bench                         # all servers, all paths
    .venv/bin/python bench/run.py --seconds 5 --servers lrp,twisted-web

Each server runs with one process and with two (`lrp --web-workers 2`,
gunicorn and granian `--workers 2`; `twistd web` has one), every process
with the same thread count: by default the pool `twistd web --wsgi` always
runs (Twisted's `ThreadPool` maximum, 20), which it has no option to
change. `bare-1` and `bare-2` are bench/bare.py: a bare Twisted protocol
with httptools and lrp's thread pool, no limits, no logging, which is the
most any server built on a Twisted reactor and a thread pool can serve.
wrk must be installed (Debian: apt-get install wrk); gunicorn, granian,
httptools and matplotlib (for the PNG chart of the table) come with the
bench extra (pip install -e '.[bench]'); a server that is missing is
skipped.
"""

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from _shared import free_port, report

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


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


def wait_until_serving(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not open its port")


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


def wrk(url: str, seconds: int, connections: int, port: int | None = None) -> dict:
    """
    Load C{url} with wrk; with C{port}, also count how the connections fall
    between the server's processes halfway through.
    """
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
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)

    def ms(match):
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "rps": rps,
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "split": split,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=_twisted_web_threads())
    parser.add_argument("--servers", default=ALL_SERVERS)
    parser.add_argument("--paths", default="/hello,/io")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--chart", default=str(HERE / "results" / "http.png"), help="PNG chart ('' for none)"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.stderr.write("bench: wrk is not installed (Debian: apt-get install wrk)\n")
        return 2
    env = dict(os.environ, PYTHONPATH=str(HERE), DJANGO_SETTINGS_MODULE="benchsite.settings")
    results: dict = {}
    for name in args.servers.split(","):
        port = free_port()
        command = servers(port, args.threads)[name]
        missing = name.startswith("bare") and importlib.util.find_spec("httptools") is None
        if missing or not Path(command[0]).exists():
            sys.stderr.write(f"bench: {name} is not installed, skipped\n")
            continue
        proc = subprocess.Popen(
            command,
            cwd=HERE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_until_serving(port, proc)
            for path in args.paths.split(","):
                url = f"http://127.0.0.1:{port}{path}"
                wrk(url, 2, args.connections)  # warm-up
                results.setdefault(path, {})[name] = wrk(url, args.seconds, args.connections, port)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    lines = [
        f"# {args.connections} connections, {args.threads} threads per process, "
        f"{args.seconds} s per run, Python {sys.version.split()[0]}, {os.cpu_count()} cores"
    ]
    for path, by_server in results.items():
        base = by_server.get("twisted-web", {}).get("rps")
        lines.append(f"\n{path}")
        lines.append(
            f"  {'server':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs twisted-web':>15}"
            f" {'connections':>12}"
        )
        for name, r in by_server.items():
            ratio = f"{r['rps'] / base:.2f}x" if base else "-"
            note = f"  ({r['non_2xx']} non-2xx)" if r["non_2xx"] else ""
            lines.append(
                f"  {name:<12} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {ratio:>15}"
                f" {r.get('split', ''):>12}{note}"
            )
        ours = by_server.get("lrp-2", {}).get("rps")
        for peer in ("gunicorn-2", "granian-2", "bare-2"):
            theirs = by_server.get(peer, {}).get("rps")
            if ours and theirs:
                lines.append(f"  lrp-2 / {peer}: {ours / theirs:.2f}x")
    if args.chart and results:
        lines.append(f"\nchart: {chart(results, args.chart, lines[0])}")
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
