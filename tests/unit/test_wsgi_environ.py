"""The PEP 3333 environ that the WSGI container builds from a request."""

import io

import pytest
from twisted.internet.address import IPv4Address

from twistedlrp.web.wsgi import build_environ


class FakeRequest:
    """What build_environ reads of a request (twistedlrp.web.http.request)."""

    def __init__(self, uri, method=b"GET", headers=None, body=b""):
        self.path, _, self.query = uri.partition(b"?")
        self.method = method
        self.clientproto = b"HTTP/1.1"
        self.headers = [(k.lower(), v) for k, values in (headers or {}).items() for v in values]
        self.content = io.BytesIO(body)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8000)


def test_path_query_and_server():
    environ = build_environ(FakeRequest(b"/caf%C3%A9/x?a=1&b=%20"), "10.0.0.5", "https")
    assert environ["PATH_INFO"] == "/café/x".encode().decode("latin-1")
    assert environ["QUERY_STRING"] == "a=1&b=%20"
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["SCRIPT_NAME"] == ""
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", "8000")
    assert environ["REMOTE_ADDR"] == "10.0.0.5"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_headers_become_http_variables_and_repeated_ones_are_joined():
    headers = {
        b"Accept": [b"text/html", b"application/json"],
        b"Content-Type": [b"application/json"],
        b"X-Custom-Thing": [b"yes"],
    }
    environ = build_environ(FakeRequest(b"/", b"POST", headers, b"{}"), "", "http")
    assert environ["HTTP_ACCEPT"] == "text/html,application/json"
    assert environ["CONTENT_TYPE"] == "application/json"
    assert "HTTP_CONTENT_TYPE" not in environ
    assert environ["HTTP_X_CUSTOM_THING"] == "yes"


def test_a_header_spelled_with_an_underscore_is_dropped():
    # It would collide with its dashed twin (X-Forwarded-For) and could be forged past a proxy.
    headers = {b"X_Forwarded_For": [b"6.6.6.6"], b"X-Forwarded-For": [b"1.2.3.4"]}
    environ = build_environ(FakeRequest(b"/", headers=headers), "", "http")
    assert environ["HTTP_X_FORWARDED_FOR"] == "1.2.3.4"


def test_a_body_without_content_length_gets_its_buffered_size():
    request = FakeRequest(b"/", b"POST", {b"Transfer-Encoding": [b"chunked"]}, b"0123456789")
    environ = build_environ(request, "", "http")
    assert environ["CONTENT_LENGTH"] == "10"
    assert environ["wsgi.input"].read() == b"0123456789"
    empty = build_environ(FakeRequest(b"/"), "", "http")
    assert "CONTENT_LENGTH" not in empty


def test_wsgi_multiprocess_says_whether_other_processes_serve_the_application():
    assert build_environ(FakeRequest(b"/"), "", "http")["wsgi.multiprocess"] is False
    assert build_environ(FakeRequest(b"/"), "", "http", True)["wsgi.multiprocess"] is True


@pytest.mark.parametrize("web_workers, multiprocess", [("1", False), ("2", True)])
def test_the_web_side_is_multiprocess_with_several_web_workers(web_workers, multiprocess):
    from twisted.internet.task import Clock

    from twistedlrp.options import Options
    from twistedlrp.web.service import build_web

    options = Options()
    options.parseOptions(["--web-workers", web_workers, "--no-static", "--no-metrics"])
    _, web, _ = build_web(Clock(), options, lambda environ, start: [], lambda: "running", 0.0)
    assert web.site.root._application.multiprocess is multiprocess
