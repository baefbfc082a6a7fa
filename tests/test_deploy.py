"""
The production examples in ``conf/``: socket activation as ``lrp.socket`` and
``lrp.service`` set it up (systemd binds, ``--listen systemd:...`` adopts);
the nginx site. And packaging: after a normal (wheel) install and after an
editable install into a fresh virtualenv, ``twistd`` finds the ``lrp`` dropin.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

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


def unit_settings() -> dict[str, dict[str, str]]:
    """The settings of conf/lrp.service, by section (the last value of a key)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in (ROOT / "conf" / "lrp.service").read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif current is not None and "=" in line and not line.startswith(("#", " ")):
            key, _, value = line.partition("=")
            current[key] = value
    return sections


def test_service_unit_restarts_after_a_failure_and_never_gives_up():
    unit = unit_settings()
    service = unit["Service"]
    # Restarted after a non-zero exit or a death by a signal, not after a stop (exit 0).
    assert service["Restart"] == "on-failure"
    # SIGTERM to twistd only (it drains its web processes and workers), SIGKILL to the rest.
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    # Longer than graceful-timeout in conf/lrp.toml.
    toml = (ROOT / "conf" / "lrp.toml").read_text()
    graceful = float(re.search(r"^#?\s*graceful-timeout = (\d+)", toml, re.M).group(1))
    assert float(service["TimeoutStopSec"]) > graceful
    # In [Unit], where systemd reads it: restarts are not rate-limited into giving up.
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert "StartLimitIntervalSec" not in service


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


# -- Packaging ------------------------------------------------------------------
#
# Each install goes into a fresh virtualenv made without pip (fast). Its
# dependencies (Twisted, Django, pip, setuptools) come from the suite's own
# environment through a .pth file naming a folder of links to everything
# there except twistedlrp itself: a .pth line adds that folder to sys.path
# without running the .pth files inside it, so the suite's editable install
# of twistedlrp stays invisible. The project is built from a copy of the
# source tree: nothing is written into the working tree, and no stale
# build/ folder can slip old modules into the wheel.


def _copy_of_the_project(target):
    shutil.copytree(
        ROOT,
        target,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "dropin.cache",
            ".lrp", "*.sqlite3", "staticfiles", ".pytest_cache", ".ruff_cache",
        ),
    )  # fmt: skip
    return target


@pytest.fixture(scope="module")
def packaging(tmp_path_factory):
    """A copy of the project and a folder with the suite's packages but twistedlrp."""
    base = tmp_path_factory.mktemp("packaging")
    deps = base / "deps"
    deps.mkdir()
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        name = entry.name.lower()
        if name.startswith(("twistedlrp", "__editable__")) or name.endswith(".pth"):
            continue
        if name == "twisted":
            # Twisted's own plugins folder must not hold a copy of the dropin.
            assert not (entry / "plugins" / "twistedlrp_plugin.py").exists()
        (deps / entry.name).symlink_to(entry)
    return _copy_of_the_project(base / "project"), deps


def _fresh_venv(path, deps):
    """@return: the python of a new virtualenv at C{path} that sees C{deps}."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)})
    (Path(site) / "_lrp_test_deps.pth").write_text(f"{deps}\n")
    return python


def _run(python, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def _check_twistd(python, cwd, expected_file):
    """C{twistd --help} lists lrp and C{twistd lrp --version} names the version."""
    import twistedlrp

    where = _run(python, "-c", "import twistedlrp; print(twistedlrp.__file__)", cwd=cwd)
    assert where.stdout.strip() == str(expected_file), where.stdout + where.stderr
    twistd = ("-c", "from twisted.scripts.twistd import run; run()")
    result = _run(python, *twistd, "--help", cwd=cwd)
    assert "lrp" in result.stdout.split(), result.stdout + result.stderr
    result = _run(python, *twistd, "lrp", "--version", cwd=cwd)
    assert f"twistedlrp {twistedlrp.__version__}" in result.stdout, result.stdout + result.stderr


def test_twistd_finds_lrp_after_installing_the_wheel(packaging, tmp_path):
    project, deps = packaging
    python = _fresh_venv(tmp_path / "venv", deps)
    wheels = tmp_path / "wheels"
    build = _run(
        python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(wheels), str(project), cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("twistedlrp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/twistedlrp_plugin.py" in names
    assert "twistedlrp/jobs/__init__.py" in names
    # The job progress widget's template, script and template tags.
    assert "twistedlrp/templates/twistedlrp/job_progress.html" in names
    assert "twistedlrp/static/twistedlrp/progress.js" in names
    assert "twistedlrp/templatetags/lrp.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "example/"))]
    install = _run(python, "-m", "pip", "install", "--no-deps", "-q", str(wheel), cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    site = Path(sysconfig.get_path("purelib", vars={"base": str(tmp_path / "venv")}))
    assert (site / "twisted" / "plugins" / "twistedlrp_plugin.py").is_file()
    _check_twistd(python, tmp_path, site / "twistedlrp" / "__init__.py")


def test_twistd_finds_lrp_after_an_editable_install(packaging, tmp_path):
    project, deps = packaging
    python = _fresh_venv(tmp_path / "venv", deps)
    install = _run(
        python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
        "-e", str(project), cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    # A plain .pth naming the project folder, where twisted/plugins/ is.
    site = Path(sysconfig.get_path("purelib", vars={"base": str(tmp_path / "venv")}))
    (pth,) = site.glob("__editable__.twistedlrp-*.pth")
    assert pth.read_text().split() == [str(project)]
    _check_twistd(python, tmp_path, project / "twistedlrp" / "__init__.py")
