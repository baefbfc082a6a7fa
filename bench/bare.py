"""
A bare Twisted WSGI server: the least a Twisted reactor plus a thread pool
can cost per request, measured beside lrp and its peers by ``bench/run.py``
(servers C{bare-1} and C{bare-2}).

    python bench/bare.py --port 8000 --processes 2 --threads 20 benchsite.wsgi

It is not a server anyone should run: an httptools parser behind a bare
Twisted protocol, the WSGI environ of the request line and headers only, no
request body, no limits, no timeouts, no logging, no metrics, no pipelining,
no streaming, the same pool lrp uses (``twistedlrp.web.pool``) and one
``callFromThread`` per response. Whatever lrp spends above it is what
twisted.web and lrp's own guarantees cost; whatever it spends above granian
is what a Twisted reactor and a thread pool cost in Python at all.
With C{--processes 2} the processes are forked after Django is set up and
share one listening socket, each taking one connection per reactor turn
(what lrp's web processes do).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import signal
import socket
import sys

# No request here has a body.
_EMPTY = io.BytesIO()


def serve(sock: socket.socket, application, threads: int) -> None:
    import httptools
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from twistedlrp.web import ports
    from twistedlrp.web.pool import ThreadPool

    pool = ThreadPool(reactor, threads, 10_000, name="bare")
    call_from_thread = reactor.callFromThread

    class Connection(Protocol):
        def connectionMade(self):
            self.parser = httptools.HttpRequestParser(self)
            self.headers: list[tuple[bytes, bytes]] = []
            self.url = b""

        def dataReceived(self, data):
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.loseConnection()

        def on_url(self, url):
            self.url += url

        def on_header(self, name, value):
            self.headers.append((name, value))

        def on_message_complete(self):
            path, _, query = self.url.partition(b"?")
            environ = {
                "REQUEST_METHOD": self.parser.get_method().decode("latin-1"),
                "SCRIPT_NAME": "",
                "PATH_INFO": path.decode("latin-1"),
                "QUERY_STRING": query.decode("latin-1"),
                "SERVER_NAME": "127.0.0.1",
                "SERVER_PORT": "80",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "REMOTE_ADDR": "127.0.0.1",
                "wsgi.version": (1, 0),
                "wsgi.url_scheme": "http",
                "wsgi.input": _EMPTY,
                "wsgi.errors": sys.stderr,
                "wsgi.multithread": True,
                "wsgi.multiprocess": False,
                "wsgi.run_once": False,
            }
            for name, value in self.headers:
                environ["HTTP_" + name.decode("latin-1").upper().replace("-", "_")] = value.decode(
                    "latin-1"
                )
            self.headers = []
            self.url = b""
            keep_alive = self.parser.should_keep_alive()
            pool.submit(lambda: self.run(environ, keep_alive))

        def run(self, environ, keep_alive):
            answer = {}

            def start_response(status, headers, exc_info=None):
                answer["status"] = status
                answer["headers"] = headers

            result = application(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            head = [b"HTTP/1.1 " + answer["status"].encode("latin-1")]
            head += [f"{k}: {v}".encode("latin-1") for k, v in answer["headers"]]
            if not any(k.lower() == "content-length" for k, _ in answer["headers"]):
                head.append(b"Content-Length: " + str(len(body)).encode())
            if not keep_alive:
                head.append(b"Connection: close")
            call_from_thread(self.answer, b"\r\n".join(head) + b"\r\n\r\n" + body, keep_alive)

        def answer(self, data, keep_alive):
            self.transport.write(data)
            if not keep_alive:
                self.transport.loseConnection()

    factory = Factory.forProtocol(Connection)
    # As lrp's web processes: one connection per reactor turn from a shared socket.
    ports.adopt(reactor, sock.fileno(), socket.AF_INET, factory, shared=True)
    sock.close()
    reactor.callWhenRunning(pool.start)
    reactor.run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("wsgi_module", help="a module with an `application`")
    args = parser.parse_args()
    application = importlib.import_module(args.wsgi_module).application
    sock = socket.create_server(("127.0.0.1", args.port), backlog=2048)
    sock.setblocking(False)
    if args.processes == 1:
        serve(sock, application, args.threads)
        return 0
    children = []
    for _ in range(args.processes):
        pid = os.fork()
        if pid == 0:
            serve(sock, application, args.threads)
            os._exit(0)
        children.append(pid)
    sock.close()

    def stop(signum, frame):
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for _ in children:
        os.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
