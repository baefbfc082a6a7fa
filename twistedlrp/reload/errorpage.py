"""The page the reload supervisor shows while no server runs."""

from __future__ import annotations

import socket

from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp.web.ports import adopt

log = Logger(namespace="twistedlrp.reload")


class ErrorPage:
    """While no server runs (broken code), answer every request 503 with the error."""

    def __init__(self, reactor, listening):
        self.reactor, self.listening = reactor, listening
        self.error = ""
        self.ports: list = []

    def start(self, error: str) -> None:
        """Show C{error} on every socket that can be adopted (if not done yet)."""
        self.error = error
        if self.ports:
            return
        site = self._site()
        for sock in self.listening:
            family = getattr(socket, "AF_" + sock.domain)
            try:
                self.ports.append(adopt(self.reactor, sock.fileno(), family, site))
            except Exception:
                message = "Cannot answer on {address} while the server is down"
                log.failure(message, address=sock.address)

    def _site(self):
        # A supervisor whose servers start never needs twisted.web.
        from twisted.web import resource, server

        page = self

        class Page(resource.Resource):
            isLeaf = True

            def render(self, request):
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.setHeader(b"retry-after", b"1")
                request.setHeader(b"cache-control", b"no-store")
                return (
                    "twistd lrp --reload: the server is not running.\n\n"
                    f"{page.error.strip()}\n\n"
                    "Fix the error and save: the server starts again then.\n"
                ).encode("utf-8", "replace")

        site = server.Site(Page())
        site.noisy = False
        site.log = lambda request: None
        site.logPrefix = lambda: "lrp-reload: error page"
        return site

    async def stop(self) -> None:
        """Stop answering; the sockets stay bound, held by the supervisor."""
        ports, self.ports = self.ports, []
        for port in ports:
            await defer.maybeDeferred(port.stopListening)
