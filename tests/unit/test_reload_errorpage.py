"""
The reload supervisor's error page answers on the sockets it holds, and
leaves them as they were (path, mode, listening) when it stops.
"""

from __future__ import annotations

import os
import stat

import pytest_twisted
from twisted.internet import defer, endpoints, protocol

from twistedlrp.reload.errorpage import ErrorPage
from twistedlrp.web.ports import adoptable, bind


class _Reader(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


async def _get(client) -> bytes:
    reader = _Reader()
    await endpoints.connectProtocol(client, reader)
    reader.transport.write(b"GET / HTTP/1.0\r\n\r\n")
    return await reader.done


def test_adoptable_endpoints():
    assert adoptable("tcp:8000")
    assert adoptable(" TCP6:8000")
    assert adoptable("unix:/run/x.sock:mode=600")
    assert not adoptable("ssl:8443:privateKey=key.pem")
    assert not adoptable("systemd:domain=INET:index=0")


@pytest_twisted.ensureDeferred
async def test_error_page_on_a_held_unix_socket(tmp_path):
    from twisted.internet import reactor

    path = str(tmp_path / "http.sock")
    sock = bind(reactor, f"unix:{path}:mode=600")
    assert (sock.domain, sock.address) == ("UNIX", f"unix:{path}")
    page = ErrorPage(reactor, [sock])
    try:
        page.start("SyntaxError: broken")
        client = endpoints.UNIXClientEndpoint(reactor, path, timeout=5)
        response = await _get(client)
        assert response.startswith(b"HTTP/1.0 503 ")
        assert b"SyntaxError: broken" in response
        page.start("NameError: still broken")
        assert b"NameError: still broken" in await _get(client)
        await page.stop()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # Still listening: a second error page (or the next server) answers.
        page.start("again")
        assert b"again" in await _get(client)
        await page.stop()
    finally:
        await page.stop()
        await sock.close()
    # The supervisor bound it: closing its port removes the path.
    assert not os.path.exists(path)


@pytest_twisted.ensureDeferred
async def test_error_page_on_a_held_tcp_socket():
    from twisted.internet import reactor

    sock = bind(reactor, "tcp:0:interface=127.0.0.1")
    assert sock.domain == "INET"
    page = ErrorPage(reactor, [sock])
    try:
        page.start("boom")
        port = sock.port.getHost().port
        client = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        assert b"boom" in await _get(client)
        await page.stop()
        page.start("boom again")
        assert b"boom again" in await _get(client)
    finally:
        await page.stop()
        await sock.close()
