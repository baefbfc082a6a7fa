"""
Outbound HTTP for views and jobs (docs/hooks.md): treq run in the reactor by
:func:`twistedlrp.call_in_reactor`, over a connection pool closed at shut-down.
"""

from __future__ import annotations

import json as _json
from typing import Any

from twisted.internet import defer

from twistedlrp.reactor_bridge import DEFAULT_TIMEOUT, call_in_reactor

__all__ = ["HTTPError", "HTTPTimeout", "HTTPConnectionError", "Response", "get", "post", "request"]

# Idle connections kept per host and how long they may stay idle.
MAX_PERSISTENT_PER_HOST = 8
IDLE_SECONDS = 60


class HTTPError(Exception):
    """A request failed; subclasses say how."""


class HTTPTimeout(HTTPError, TimeoutError):
    """No complete response within the timeout."""


class HTTPConnectionError(HTTPError, ConnectionError):
    """The server could not be reached or dropped the connection."""


class HTTPStatusError(HTTPError):
    """Raised by L{Response.raise_for_status} for 4xx and 5xx answers."""

    def __init__(self, response: Response):
        super().__init__(f"{response.status_code} for {response.url}")
        self.response = response


class Response:
    """A complete HTTP response; C{headers} maps lower-case names to their last value."""

    def __init__(self, url: str, status_code: int, headers: dict[str, str], content: bytes):
        self.url, self.status_code, self.headers, self.content = url, status_code, headers, content

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def encoding(self) -> str:
        from django.utils.http import parse_header_parameters

        _, parameters = parse_header_parameters(self.headers.get("content-type", ""))
        return parameters.get("charset") or "utf-8"

    @property
    def text(self) -> str:
        return self.content.decode(self.encoding, "replace")

    def json(self) -> Any:
        """@return: the body parsed as JSON. @raise ValueError: it is not JSON."""
        return _json.loads(self.content)

    def raise_for_status(self) -> Response:
        """@raise HTTPStatusError: the status is 4xx or 5xx. @return: self."""
        if self.status_code >= 400:
            raise HTTPStatusError(self)
        return self

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}] {self.url}>"


_pool = None


def close_connections():
    """@return: a Deferred that fires once the pooled connections are closed."""
    global _pool
    pool, _pool = _pool, None
    if pool is None:
        return defer.succeed(None)
    return pool.closeCachedConnections()


async def _fetch(method: str, url: str, kwargs: dict, timeout: float) -> Response:
    import treq
    from twisted.internet import error, reactor
    from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
    from twisted.web.client import RequestTransmissionFailed as Unsent

    global _pool
    if _pool is None:
        _pool = HTTPConnectionPool(reactor, persistent=True)
        _pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        _pool.cachedConnectionTimeout = IDLE_SECONDS
    try:
        response = await treq.request(method, url, pool=_pool, timeout=timeout, **kwargs)
        body = await treq.content(response)
    except (defer.CancelledError, error.TimeoutError) as e:
        raise HTTPTimeout(f"{method} {url}: no response within {timeout} s") from e
    except (error.ConnectError, error.DNSLookupError, error.ConnectionLost) as e:
        raise HTTPConnectionError(f"{method} {url}: {e}") from e
    except (ResponseNeverReceived, ResponseFailed, Unsent) as e:
        reasons = e.reasons
        # treq's timeout cancels the request, which surfaces as a reason.
        if any(r.check(defer.CancelledError, error.TimeoutError) for r in reasons):
            raise HTTPTimeout(f"{method} {url}: no response within {timeout} s") from e
        text = "; ".join(str(r.value) for r in reasons) or str(e)
        raise HTTPConnectionError(f"{method} {url}: {text}") from e
    headers = {
        name.decode("latin-1").lower(): values[-1].decode("latin-1")
        for name, values in response.headers.getAllRawHeaders()
    }
    return Response(url, response.code, headers, body)


def request(method: str, url: str, *, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Response:
    """
    Send a request and read the whole response; C{kwargs} are C{treq.request}'s.

    @return: a L{Response}, whatever its status (see L{Response.raise_for_status}).
    @raise HTTPTimeout: no complete response within C{timeout} seconds.
    @raise HTTPConnectionError: the host could not be reached or hung up.
    @raise twistedlrp.ShutdownInProgress: the server is shutting down.
    """
    method = method.upper()
    try:
        # The reactor-side timeout fires first; the thread-side one is a backstop.
        return call_in_reactor(_fetch, method, url, kwargs, timeout, timeout=timeout + 5)
    except TimeoutError as e:
        if isinstance(e, HTTPTimeout):
            raise
        raise HTTPTimeout(f"{method} {url}: no response within {timeout} s") from e


def get(url: str, **kwargs: Any) -> Response:
    return request("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> Response:
    return request("POST", url, **kwargs)
