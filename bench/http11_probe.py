"""
What twistedlrp's own HTTP/1.1 protocol (twistedlrp.web.http) costs per
request, against the floor of ``bench/bare.py`` (a bare Twisted protocol
over httptools, no limits), under wrk:

    python bench/http11_probe.py [--rounds 5] [--duration 5] [--threads 8]

Servers, one process each on loopback, all serving ``/hello`` (6 bytes):

- ``http11-reactor``: our protocol, answered in the reactor (what static
  files, ``/-/health`` and ``/-/metrics`` cost);
- ``http11-pool``: our protocol, a trivial WSGI application run in the pool
  (``twistedlrp.web.pool``), handed off and back as ``bench/bare.py`` does;
- ``bare``: ``bench/bare.py`` with the same application;
- ``bare-reactor``: ``bench/bare.py``'s protocol answering in the reactor
  (the floor of ``http11-reactor``);
- ``lrp``: the server's serving path (the protocol under lrp's site, router
  and WSGI container, with its Server and Date headers and forwarded-header
  checks) with the same application, no access log: what ``http11-pool``
  costs once wired in.

Each round runs ``wrk -t1 -c32 -d5s`` against each server in turn (the
rounds alternate, as the machine is shared); the reactor thread's CPU (and
the other threads') comes from ``/proc/<pid>/task/<tid>/stat`` before and
after. The table gives the medians and the ratios to ``bare``.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICKS = os.sysconf("SC_CLK_TCK")
FLOOR_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"


def application(environ, start_response):
    """The trivial WSGI application of the pool servers."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\n"]


def serve(mode: str, port: int, threads: int) -> None:
    """Serve /hello on C{port} with our protocol, in the reactor or the pool."""
    from twisted.internet import epollreactor

    epollreactor.install()
    import httptools
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from twistedlrp.web import ports
    from twistedlrp.web.pool import ThreadPool
    from twistedlrp.web.site import LRPSite

    pool = ThreadPool(reactor, threads, 10_000, name="probe")
    call_from_thread = reactor.callFromThread

    def deliver(request, status, headers, body):
        code, _, reason = status.partition(" ")
        request.setResponseCode(int(code), reason.encode())
        for name, value in headers:
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        request.write(body)
        request.finish()

    class Site(LRPSite):
        def handle(self, request):
            if mode == "reactor":
                request.setHeader(b"content-type", b"text/plain")
                request.setHeader(b"content-length", b"6")
                request.write(b"hello\n")
                request.finish()
                return
            environ = {
                "REQUEST_METHOD": request.method.decode("latin-1"),
                "PATH_INFO": request.path.decode("latin-1"),
                "QUERY_STRING": request.query.decode("latin-1"),
                "wsgi.input": request.content,
            }
            for name, value in request.headers:
                environ["HTTP_" + name.decode("latin-1").upper().replace("-", "_")] = value.decode(
                    "latin-1"
                )
            pool.submit(lambda: run(request, environ))

    def run(request, environ):
        answer = []

        def start_response(status, headers, exc_info=None):
            answer[:] = [status, headers]

        body = b"".join(application(environ, start_response))
        call_from_thread(deliver, request, answer[0], answer[1], body)

    class Floor(Protocol):
        """bench/bare.py's protocol, answering in the reactor: the least it can cost."""

        def connectionMade(self):
            self.parser = httptools.HttpRequestParser(self)

        def dataReceived(self, data):
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.loseConnection()

        def on_message_complete(self):
            self.transport.write(FLOOR_ANSWER)

    if mode == "floor":
        factory = Factory.forProtocol(Floor)
    elif mode == "today":
        factory = lrp_site(reactor, pool)
    else:
        factory = Site(reactor)
    sock = socket.create_server(("127.0.0.1", port), backlog=2048)
    sock.setblocking(False)
    ports.adopt(reactor, sock.fileno(), socket.AF_INET, factory, shared=True)
    sock.close()
    reactor.callWhenRunning(pool.start)
    reactor.run()


def lrp_site(reactor, pool):
    """@return: the server's serving path: lrp's site, router and WSGI container."""
    from twistedlrp.web.site import LRPSite, Router
    from twistedlrp.web.wsgi import WSGIResource

    def saturated(request):
        request.setResponseCode(503)
        return b"busy\n"

    wsgi = WSGIResource(reactor, pool, application, saturated)
    root = Router("/-/health", None, [], wsgi)
    return LRPSite(reactor, root)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(name: str, threads: int) -> tuple[subprocess.Popen, int]:
    """@return: the process of server C{name}, listening, and its port."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{ROOT}")
    if name == "bare":
        args = [HERE / "bare.py", "--port", port, "--threads", threads, "http11_probe"]
    else:
        mode = {"bare-reactor": "floor", "lrp": "today"}.get(name) or name.split("-")[1]
        args = [__file__, "--serve", mode, "--port", port, "--threads", threads]
    process = subprocess.Popen([sys.executable, *map(str, args)], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{name} did not listen on {port}")


def cpu_ticks(pid: int) -> dict[int, int]:
    """@return: utime + stime (clock ticks) of each thread of C{pid}."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def measure(pid: int, port: int, duration: int) -> tuple[float, float, float]:
    """@return: requests/s, and µs of CPU per request in the reactor thread and in the others."""
    before = cpu_ticks(pid)
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{duration}s", f"http://127.0.0.1:{port}/hello"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = cpu_ticks(pid)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"  wrk: {errors.group(0)}", file=sys.stderr)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    used = {tid: after[tid] - before.get(tid, 0) for tid in after}
    reactor = used.get(pid, 0) / TICKS
    others = sum(v for tid, v in used.items() if tid != pid) / TICKS
    return rate, reactor * 1e6 / requests, others * 1e6 / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=("reactor", "pool", "floor", "today"))
    parser.add_argument("--port", type=int)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.threads)
        return 0
    names = ["http11-reactor", "http11-pool", "bare", "bare-reactor", "lrp"]
    servers = {name: start(name, args.threads) for name in names}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    try:
        for process, port in servers.values():
            measure(process.pid, port, 1)  # warm up
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            for name in order:
                process, port = servers[name]
                results[name].append(measure(process.pid, port, args.duration))
                rate, reactor, others = results[name][-1]
                print(
                    f"round {round_ + 1} {name:15} {rate:9.0f} req/s  reactor {reactor:6.1f} µs"
                    f"  other threads {others:6.1f} µs",
                    flush=True,
                )
    finally:
        for process, _ in servers.values():
            process.kill()
            process.wait()
    medians = {
        name: [statistics.median(r[i] for r in rows) for i in range(3)]
        for name, rows in results.items()
    }
    bare = medians["bare"]
    print(f"\nmedians of {args.rounds} rounds, wrk -t1 -c32 -d{args.duration}s, /hello")
    print(
        f"{'server':15} {'req/s':>9} {'×bare':>6} {'reactor µs':>11} {'×bare':>6} {'others µs':>10}"
    )
    for name, (rate, reactor, others) in medians.items():
        print(
            f"{name:15} {rate:9.0f} {rate / bare[0]:6.2f} {reactor:11.1f} "
            f"{reactor / bare[1]:6.2f} {others:10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
