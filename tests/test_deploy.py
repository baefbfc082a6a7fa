"""
The production examples in ``conf/``: socket activation as ``lrp.socket`` and
``lrp.service`` set it up (systemd binds, ``--listen systemd:...`` adopts).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess

import pytest

from support import ROOT, TESTSITE, TWISTD, free_port, request, wait_for

ACTIVATE = shutil.which("systemd-socket-activate")


def unit_command() -> list[str]:
    """The ExecStart= command of conf/lrp.service, as arguments."""
    text = (ROOT / "conf" / "lrp.service").read_text()
    match = re.search(r"^ExecStart=(.*?)(?<!\\)$", text, re.M | re.S)
    return shlex.split(match.group(1).replace("\\\n", " "))


def test_service_unit_runs_twistd_in_the_foreground_with_the_systemd_endpoint():
    command = unit_command()
    assert command[1:4] == ["--nodaemon", "--pidfile=", "lrp"]
    assert command[command.index("--listen") + 1] == "systemd:domain=INET:index=0"
    assert "--config" in command


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
@pytest.mark.parametrize(
    "endpoint", ["systemd:domain=INET:index=0", "systemd:domain=INET:name=http"]
)
def test_socket_activation(tmp_path, endpoint):
    port = free_port()
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["LRP_TEST_DB"] = str(tmp_path / "db.sqlite3")
    log = open(tmp_path / "output.log", "wb")
    # As lrp.socket: systemd binds 127.0.0.1:PORT, names the socket "http",
    # and starts the service on the first connection.
    proc = subprocess.Popen(
        [
            ACTIVATE,
            "--listen",
            f"127.0.0.1:{port}",
            "--fdname=http",
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "lrp",
            "--settings=testsite.settings",
            f"--state-dir={tmp_path / 'state'}",
            f"--listen={endpoint}",
        ],
        cwd=TESTSITE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = lambda: (tmp_path / "output.log").read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: "Listening on" in output(), 10, message="systemd-socket-activate")
        # This first request starts twistd; it waits in the backlog meanwhile.
        response = request(port, "/hello", timeout=60)
        assert response.status == 200, output()
        assert response.text == "hello\n"
        assert "twistedlrp running" in output()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


NGINX = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None


@pytest.mark.skipif(not NGINX or not shutil.which("openssl"), reason="nginx is not installed")
def test_nginx_site_proxies_with_forwarded_headers_and_serves_static(lrp_server, tmp_path):
    """conf/nginx-lrp.conf, with its paths and ports changed to a sandbox."""
    import ssl

    server = lrp_server("--proxy-headers", "--no-static")
    http_port, https_port = free_port(), free_port()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(tmp_path / "key.pem"),
         "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    static = tmp_path / "staticfiles"
    (static / "css").mkdir(parents=True)
    (static / "css" / "site.css").write_text("body { color: green }\n")
    site = (ROOT / "conf" / "nginx-lrp.conf").read_text()
    for old, new in [
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{server.port};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:443 ssl http2;", ""),
        ("/etc/letsencrypt/live/example.com/fullchain.pem", str(tmp_path / "cert.pem")),
        ("/etc/letsencrypt/live/example.com/privkey.pem", str(tmp_path / "key.pem")),
        ("/srv/mysite/staticfiles/", f"{static}/"),
        ("/srv/mysite/media/", f"{tmp_path}/media/"),
    ]:
        assert old in site, old
        site = site.replace(old, new)
    (tmp_path / "site.conf").write_text(site)
    # Workers that can read the test's private temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    (tmp_path / "nginx.conf").write_text(
        f"""
        {user}
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log;
        daemon off;
        events {{}}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body;
            proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fastcgi;
            uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            include {tmp_path}/site.conf;
        }}
        """
    )
    check = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    nginx = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        start_new_session=True,
    )
    try:
        import http.client

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def get(path, headers=None):
            conn = http.client.HTTPSConnection("127.0.0.1", https_port, context=context, timeout=10)
            try:
                conn.request("GET", path, headers={"Host": "example.com", **(headers or {})})
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        def up():
            try:
                return get("/hello")
            except OSError:
                return None

        assert wait_for(up, 10, message="nginx") == (200, b"hello\n")
        import json

        environ = json.loads(get("/environ")[1])
        assert environ["REMOTE_ADDR"] == "127.0.0.1"
        assert environ["headers"]["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
        assert environ["is_secure"] is True
        assert environ["wsgi.url_scheme"] == "https"
        # nginx appends the address it saw to what the client sent (lrp takes
        # the nearest untrusted hop), and replaces the client's scheme.
        forged = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "http"}
        environ = json.loads(get("/environ", forged)[1])
        assert environ["headers"]["HTTP_X_FORWARDED_FOR"] == "6.6.6.6, 127.0.0.1"
        assert environ["is_secure"] is True
        # nginx serves the static files itself.
        assert get("/static/css/site.css") == (200, b"body { color: green }\n")
        assert "/static/css/site.css" not in server.output()
        # Plain HTTP is redirected.
        assert request(http_port, "/hello", headers={"Host": "example.com"}).status == 301
    finally:
        nginx.terminate()
        nginx.wait(10)
