"""
docs/deploying.md "Several machines", run as an operator would: each
machine is a network namespace of its own on a bridge (10.0.0.0/24,
inside the namespaces only; the host's own network is not touched),
PostgreSQL on 10.0.0.4, two job nodes (10.0.0.5, 10.0.0.6), two web nodes
(10.0.0.11, 10.0.0.12) serving the demo site in example/, nginx on
10.0.0.2 with conf/nginx-lrp.conf, and a client on 10.0.0.100. The
environment file, the secret's commands, the PostgreSQL commands and the
three TOML files are read from the document and run as written: only
paths (/etc/lrp, /srv/twistedlrp, the PostgreSQL binaries), the second
web node's address and the number of workers are changed. Then, with
requests going through nginx all along:

1. kill -9 of the first job node (the one the web nodes send their job
   calls to): pages that do not use jobs keep answering, submissions fail
   over to the other job node, none fails;
2. the first job node's link cut for 20 s while it runs jobs: submissions
   move to the other node, no job runs twice (each run of the import job
   writes its contacts under a batch id of its own: one batch per job),
   and the other node keeps its lease all along;
3. PostgreSQL stopped and started again: every submission is answered
   202, or 503 with JobServiceUnavailable ("not stored"), none fails
   otherwise, and every job submitted runs once it is back;
4. a rolling restart of both web nodes behind nginx, each drained first
   as the document says: no request lost, POSTs included.

Runs with LRP_TEST_TOPOLOGY=1 (`make test-topology` sets it; not in the
whole suite); needs root, `ip netns`, PostgreSQL (/usr/lib/postgresql/*/bin)
and nginx, and is skipped without them. The times it measures are
printed (pytest -s) and stated in the document.
"""

from __future__ import annotations

import ctypes
import glob
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploydoc import block, commands

from support import wait_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "example"
BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
CLONE_NEWNET = 0x40000000

ADDRESSES = {
    "lb": "10.0.0.2",
    "pg": "10.0.0.4",
    "jobs1": "10.0.0.5",
    "jobs2": "10.0.0.6",
    "web1": "10.0.0.11",
    "web2": "10.0.0.12",
    "client": "10.0.0.100",
}
HOST = "example.com"
CSRF = "t" * 32
LINK_CUT = 20.0
DB_OUTAGE = 10.0


def _why_not() -> str | None:
    if os.environ.get("LRP_TEST_TOPOLOGY") != "1":
        # Two minutes of six servers: not in the whole suite, on its own (CI does).
        return "run by make test-topology (LRP_TEST_TOPOLOGY=1)"
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "needs root (network namespaces; CI runs as root)"
    if not shutil.which("ip"):
        return "needs ip (iproute2)"
    if not PG_BINS:
        return "needs PostgreSQL (/usr/lib/postgresql/*/bin)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs a postgres user to run PostgreSQL as"
    if not NGINX or not shutil.which("openssl"):
        return "needs nginx and openssl"
    probe = f"lrpt-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns is unavailable here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


WHY_NOT = _why_not()
pytestmark = [
    pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""),
    pytest.mark.timeout(600),
]


def run(*args, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


def enter(netns: str) -> None:
    """Move the calling thread (only) into the network namespace C{netns}."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


class Network:
    """A bridge in a namespace of its own, and one namespace per machine plugged into it."""

    def __init__(self):
        self.prefix = f"lrpt{os.getpid()}"
        self.made: list[str] = []

    @staticmethod
    def sweep() -> None:
        """Remove the namespaces of earlier runs whose test process is gone (killed)."""
        for line in run("ip", "netns", "list").stdout.splitlines():
            match = re.match(r"(lrpt(\d+)-\S+)", line)
            if match and not os.path.exists(f"/proc/{match.group(2)}"):
                Network._empty(match.group(1))
                run("ip", "netns", "del", match.group(1), check=False)
        for path in glob.glob(os.path.join(tempfile.gettempdir(), "lrp-topology-pg-*-*")):
            pid = path.rsplit("lrp-topology-pg-", 1)[1].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _empty(ns: str) -> None:
        """Kill what still runs inside C{ns} (only this test's processes run there)."""
        for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
            if int(pid) == os.getpid():
                continue  # (never the test itself)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def ns(self, machine: str) -> str:
        return f"{self.prefix}-{machine}"

    def build(self) -> None:
        self.sweep()
        switch = self.ns("switch")
        run("ip", "netns", "add", switch)
        self.made.append(switch)
        run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", switch, "link", "set", "br0", "up")
        for machine, address in ADDRESSES.items():
            ns = self.ns(machine)
            run("ip", "netns", "add", ns)
            self.made.append(ns)
            run("ip", "-n", switch, "link", "add", f"v-{machine}", "type", "veth", "peer",
                "name", "eth0", "netns", ns)  # fmt: skip
            run("ip", "-n", switch, "link", "set", f"v-{machine}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, machine: str, down: bool) -> None:
        """Its cable pulled (or plugged back): the switch's side of its link."""
        run("ip", "-n", self.ns("switch"), "link", "set", f"v-{machine}", "down" if down else "up")

    def destroy(self) -> None:
        # Whatever still runs inside (only this test's processes) goes first.
        for ns in self.made:
            self._empty(ns)
        for ns in reversed(self.made):
            run("ip", "netns", "del", ns, check=False)
        self.made.clear()


class Postgres:
    """A throwaway cluster on 10.0.0.4:5432 (and a socket in its directory for the test)."""

    def __init__(self, network: Network):
        self.bin = PG_BINS[-1]
        self.dir = Path(tempfile.mkdtemp(prefix=f"lrp-topology-pg-{os.getpid()}-"))
        self.data = self.dir / "data"
        self.network = network
        shutil.chown(self.dir, "postgres")
        self.env = dict(os.environ, PGHOST=str(self.dir), PGPORT="5432", PGUSER="postgres")
        self.env["PATH"] = f"{self.bin}:{self.env['PATH']}"

    def as_postgres(self, *args, **kwargs):
        return run("runuser", "-u", "postgres", "--", *args, env=self.env, **kwargs)

    def init(self) -> None:
        self.as_postgres(f"{self.bin}/initdb", "-D", str(self.data), "-U", "postgres",
                         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                         "--no-locale")  # fmt: skip
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write("host mysite mysite 10.0.0.0/24 scram-sha-256\n")

    def start(self) -> None:
        run("ip", "netns", "exec", self.network.ns("pg"), "runuser", "-u", "postgres", "--",
            f"{self.bin}/pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"),
            "-w", "-t", "60", "-o",
            f"-k {self.dir} -c listen_addresses=10.0.0.4 -p 5432 -c max_connections=200 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            "start", env=self.env)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self.as_postgres(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", mode, "-w",
                             "stop", check=False)  # fmt: skip

    def query(self, sql: str, *params):
        import psycopg

        with psycopg.connect(host=str(self.dir), port=5432, user="postgres", dbname="mysite") as c:
            return c.execute(sql, params).fetchall()

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class Node:
    """twistd lrp as conf/lrp.service starts it, in its machine's namespace."""

    def __init__(self, name, network, etc: Path, env: dict, logs: Path):
        self.name, self.network, self.etc, self.env, self.logs = name, network, etc, env, logs
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = self.logs / f"{self.name}.{self.starts}.log"
        state = self.logs / f"{self.name}-state"
        state.mkdir(exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.network.ns(self.name), str(BIN / "twistd"),
                 "--nodaemon", "--pidfile=", "lrp", "--config", str(self.etc / f"{self.name}.toml"),
                 "--state-dir", str(state)],
                cwd=EXAMPLE, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig=signal.SIGTERM, timeout=60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.kill(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# -- the client ------------------------------------------------------------------


class Client:
    """HTTPS through nginx (and HTTP to a node), from the client machine's namespace."""

    def __init__(self, network: Network):
        self.netns = network.ns("client")
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        # The test's own threads stay in the host's namespace: a request
        # from one of them is made by a thread of this pool.
        self.pool = ThreadPoolExecutor(4, "client", initializer=enter, initargs=(self.netns,))
        self.inside = threading.local()

    def enter(self) -> None:
        """Move the calling thread, a thread of the load's, into the client's namespace."""
        enter(self.netns)
        self.inside.yes = True

    def _call(self, fn, *args, **kwargs):
        if getattr(self.inside, "yes", False):
            return fn(*args, **kwargs)
        return self.pool.submit(fn, *args, **kwargs).result()

    def request(self, *args, **kwargs):
        """@return: (status, body) or (None, the error)."""
        return self._call(self._request, *args, **kwargs)

    def health(self, *args):
        return self._call(self._health, *args)

    def _request(self, method, path, address=ADDRESSES["lb"], timeout=60.0):
        conn = http.client.HTTPSConnection(address, 443, context=self.context, timeout=timeout)
        headers = {"Host": HOST, "Accept": "application/json"}
        if method == "POST":
            headers.update(
                {
                    "Cookie": f"csrftoken={CSRF}",
                    "X-CSRFToken": CSRF,
                    "Origin": f"https://{HOST}",
                    "Referer": f"https://{HOST}/",
                    "Content-Length": "0",
                }
            )
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError as e:
            return None, repr(e)
        finally:
            conn.close()

    def _health(self, address: str, port: int):
        conn = http.client.HTTPConnection(address, port, timeout=5)
        try:
            conn.request("GET", "/-/health")
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        except (OSError, ValueError):
            return None, {}
        finally:
            conn.close()


class Load:
    """
    Requests through nginx until stopped: pages from C{pages} threads (a
    page every 0.1 s each) and a submission of the import job every
    C{every} s; each one recorded with its start, its duration and its answer.
    """

    def __init__(self, client: Client, pages: int = 2, every: float = 0.5, submitters: int = 1):
        self.client, self.stop_at = client, threading.Event()
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._pages, daemon=True) for _ in range(pages)]
        self.threads += [
            threading.Thread(target=self._submits, args=(every,), daemon=True)
            for _ in range(submitters)
        ]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_at.set()
        for thread in self.threads:
            thread.join(90)

    def _record(self, kind, started, answer) -> None:
        status, body = answer
        record = {"kind": kind, "at": started, "took": time.monotonic() - started}
        record.update(status=status, body=body)
        if kind == "submit" and status == 202:
            record["job"] = json.loads(body)["id"]
        with self.lock:
            self.records.append(record)

    def _pages(self) -> None:
        self.client.enter()
        while not self.stop_at.is_set():
            started = time.monotonic()
            self._record("page", started, self.client.request("GET", "/admin/login/"))
            self.stop_at.wait(max(0.1 - (time.monotonic() - started), 0))

    def _submits(self, every: float) -> None:
        self.client.enter()
        while not self.stop_at.is_set():
            started = time.monotonic()
            self._record("submit", started, self.client.request("POST", "/import"))
            self.stop_at.wait(max(every - (time.monotonic() - started), 0))

    def of(self, kind, since=0.0, until=float("inf")) -> list[dict]:
        with self.lock:
            return [r for r in self.records if r["kind"] == kind and since <= r["at"] < until]

    def jobs(self) -> list[str]:
        return [r["job"] for r in self.of("submit") if "job" in r]

    def wait_for(self, kind, count, timeout=60.0) -> None:
        wait_for(lambda: len(self.of(kind)) >= count, timeout, 0.05, f"{count} {kind} answered")


def failures(records, allowed=(200, 202)) -> list[dict]:
    return [r for r in records if r["status"] not in allowed]


# -- the test --------------------------------------------------------------------------


class Site:
    """Everything, built from the document; taken down whatever happens."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.etc = tmp / "etc-lrp"
        self.etc.mkdir()
        self.network = Network()
        self.pg = Postgres(self.network)
        self.nodes: dict[str, Node] = {}
        self.nginx: subprocess.Popen | None = None
        self.client = Client(self.network)

    def localise(self, text: str) -> str:
        for old, new in [
            ("/etc/lrp", str(self.etc)),
            ("/srv/twistedlrp/example", str(EXAMPLE)),
            ("../venv/bin/", f"{BIN}/"),
            ("sudo -u postgres", "runuser -u postgres --"),
            ("workers = 8", "workers = 2"),
        ]:
            text = text.replace(old, new)
        return text

    def build(self) -> None:
        self.network.build()
        self.pg.init()
        self.pg.start()
        for command in commands("sudo -u postgres psql", "sudo -u postgres createdb"):
            run("bash", "-ec", self.localise(command), env=self.pg.env)
        # The environment file and the secret, as the document makes them.
        env_file = self.etc / "mysite.env"
        env_file.write_text(block("sh", "/etc/lrp/mysite.env on every node"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", DJANGO_SETTINGS_MODULE="mysite.settings")
        for line in env_file.read_text().splitlines():
            if line and not line.startswith("#"):
                name, value = line.split("=", 1)
                self.env[name] = value
        self.env.pop("LRP_TEST_POSTGRES", None)
        for command in commands("head -c 32 /dev/urandom", "chmod 600"):
            run("bash", "-ec", self.localise(command))
        (migrate,) = commands("cd /srv/twistedlrp/example &&")
        run("ip", "netns", "exec", self.network.ns("jobs1"), "bash", "-ec", self.localise(migrate),
            env=self.env, timeout=180)  # fmt: skip
        # The three TOML files.
        web = block("toml", "/etc/lrp/lrp.toml on each web node, with several job nodes")
        for name, text in [
            ("jobs1", block("toml", "/etc/lrp/lrp.toml on the job node")),
            ("jobs2", block("toml", "/etc/lrp/lrp.toml on a second job node")),
            ("web1", web),
            ("web2", web.replace("interface=10.0.0.11", "interface=10.0.0.12")),
        ]:
            (self.etc / f"{name}.toml").write_text(self.localise(text))
            self.nodes[name] = Node(name, self.network, self.etc, self.env, self.tmp)
        for node in self.nodes.values():
            node.start()
        for name in ("jobs1", "jobs2"):
            self.wait_healthy(name)
        for name in ("web1", "web2"):
            self.wait_healthy(name)
            self.wait_links(name, "up", "up")
        self.start_nginx()

    def health(self, name: str):
        port = 9101 if name.startswith("jobs") else 8000
        return self.client.health(ADDRESSES[name], port)

    def wait_healthy(self, name: str, timeout: float = 90) -> None:
        node = self.nodes[name]

        def up():
            assert node.proc.poll() is None, f"{name} exited:\n{node.output()}"
            return self.health(name)[0] == 200

        wait_for(up, timeout, 0.1, f"{name}'s /-/health answers 200")

    def wait_links(self, web: str, *states, timeout: float = 30) -> dict:
        def links():
            status, body = self.health(web)
            link = body.get("job_link") or {}
            return [n.get("state") for n in link.get("nodes", [])] == list(states) and link

        return wait_for(links, timeout, 0.1, f"{web}'s job links {states}")

    def nginx_conf(self, down: str | None = None) -> None:
        site = (ROOT / "conf" / "nginx-lrp.conf").read_text()
        lines = []
        for line in site.splitlines():
            # The upstream as the document says: the two web nodes, one of them drained.
            if line.strip() == "server 127.0.0.1:8000;" or line.strip().startswith("listen [::]"):
                continue
            match = re.match(r"(\s*)# (server 10\.0\.0\.1[12]:8000 .*);$", line)
            if match:
                drained = down is not None and ADDRESSES[down] in line
                line = match.group(1) + match.group(2) + (" down;" if drained else ";")
            lines.append(line)
        site = "\n".join(lines) + "\n"
        for old, new in [
            ("/etc/letsencrypt/live/example.com/fullchain.pem", str(self.tmp / "cert.pem")),
            ("/etc/letsencrypt/live/example.com/privkey.pem", str(self.tmp / "key.pem")),
            ("/srv/mysite/staticfiles/", f"{self.tmp}/staticfiles/"),
            ("/srv/mysite/media/", f"{self.tmp}/media/"),
        ]:
            assert old in site, old
            site = site.replace(old, new)
        assert site.count("server 10.0.0.1") == 2, site
        (self.tmp / "site.conf").write_text(site)

    def start_nginx(self) -> None:
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN={HOST}", "-keyout", str(self.tmp / "key.pem"),
            "-out", str(self.tmp / "cert.pem"))  # fmt: skip
        self.nginx_conf()
        t = self.tmp
        (t / "nginx.conf").write_text(
            f"user root;\npid {t}/nginx.pid;\nerror_log {t}/nginx-error.log;\ndaemon off;\n"
            f"worker_processes 1;\nevents {{}}\nhttp {{\n  access_log {t}/nginx-access.log;\n"
            f"  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n"
            f"  fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n"
            f"  scgi_temp_path {t}/scgi;\n  include {t}/site.conf;\n}}\n"
        )
        self.nginx_args = [NGINX, "-p", str(t), "-c", str(t / "nginx.conf")]
        run(*self.nginx_args, "-t")
        self.nginx = subprocess.Popen(
            ["ip", "netns", "exec", self.network.ns("lb"), *self.nginx_args],
            start_new_session=True,
        )
        wait_for(
            lambda: self.client.request("GET", "/admin/login/", timeout=5)[0] == 200,
            30,
            0.1,
            "nginx answers",
        )

    def reload_nginx(self, down: str | None) -> None:
        self.nginx_conf(down)
        run(*self.nginx_args, "-s", "reload")

    def established(self, web: str) -> int:
        """@return: the connections to the web node's port 8000 (nginx's, kept alive)."""
        out = run("ip", "netns", "exec", self.network.ns(web), "ss", "-Htn", "state",
                  "established", "( sport = :8000 )").stdout  # fmt: skip
        return len(out.splitlines())

    def jobs(self, ids) -> dict[str, tuple]:
        rows = self.pg.query(
            "select id::text, state, attempts, node, result from twistedlrp_job "
            "where id::text = any(%s)",
            [str(i) for i in ids],
        )
        return {r[0]: r[1:] for r in rows}

    def wait_finished(self, ids, timeout=120) -> dict[str, tuple]:
        def done():
            found = self.jobs(ids)
            finished = {"succeeded", "failed", "cancelled"}
            return (
                len(found) == len(set(ids))
                and all(v[0] in finished for v in found.values())
                and found
            )

        return wait_for(done, timeout, 0.25, f"{len(ids)} jobs finished")

    def idle(self, timeout=120) -> None:
        wait_for(
            lambda: (
                not self.pg.query(
                    "select 1 from twistedlrp_job where state in ('queued', 'running')"
                )
            ),
            timeout,
            0.25,
            "no job queued or running",
        )

    def batches(self) -> dict[str, int]:
        return dict(self.pg.query("select batch, count(*) from demo_contact group by batch"))

    def close(self) -> None:
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
            try:
                self.nginx.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
        for node in self.nodes.values():
            node.stop(signal.SIGKILL, timeout=10)
        self.client.pool.shutdown(wait=False, cancel_futures=True)
        self.pg.remove()
        self.network.destroy()


def _terminated(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    # A CI timeout's SIGTERM still takes everything down (the finally below).
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        site.build()
        yield site
    except BaseException:
        for node in site.nodes.values():
            if node.proc is not None:
                sys.stderr.write(f"---- {node.name} ----\n{node.output()[-6000:]}\n")
        raise
    finally:
        try:
            site.close()
        finally:
            signal.signal(signal.SIGTERM, previous)


def report(name: str, value) -> None:
    sys.stderr.write(f"[topology] {name}: {value}\n")
    sys.stderr.flush()


def test_several_machines_survive_a_crash_a_cut_a_database_restart_and_a_rolling_restart(site):
    # Again: pytest-twisted's reactor, started since the fixture, put its own.
    signal.signal(signal.SIGTERM, _terminated)
    started = time.monotonic()
    jobs1, jobs2 = site.nodes["jobs1"], site.nodes["jobs2"]
    ran_once_before = 0

    # 1. kill -9 of the job node the web nodes send their job calls to, under load.
    with Load(site.client) as load:
        load.wait_for("submit", 6)
        load.wait_for("page", 20)
        killed = time.monotonic()
        jobs1.kill(signal.SIGKILL)
        jobs1.proc.wait(30)
        wait_for(lambda: len(load.of("submit", since=killed + 0.5)) >= 8, 60, 0.05, "submits")
        ended = time.monotonic()
    pages, submits = load.of("page", since=killed), load.of("submit", since=killed - 0.5)
    assert not failures(load.records), failures(load.records)
    worst = max(r["took"] for r in submits)
    report("kill -9 of a job node: slowest submission around it (s)", round(worst, 3))
    report("kill -9: slowest page after it (s)", round(max(r["took"] for r in pages), 3))
    assert worst < 5.0, submits
    for web in ("web1", "web2"):
        link = site.health(web)[1]["job_link"]
        assert link["node"] == "tcp:10.0.0.6:8001", link
    report("kill -9: requests through nginx", f"{len(load.records)}, none failed")
    # It comes back (same name): it retries what it left at once.
    jobs1.start()
    site.wait_healthy("jobs1")
    for web in ("web1", "web2"):
        site.wait_links(web, "up", "up")
    site.wait_finished(load.jobs())
    site.idle()
    report("kill -9 phase took (s)", round(time.monotonic() - started, 1))
    _ = ended

    # 2. The first job node's link cut for 20 s while it runs jobs.
    phase = time.monotonic()
    before = site.batches()
    ran_once_before = len(before)
    with Load(site.client, pages=1, every=1.0) as load:
        wait_for(
            lambda: site.pg.query(
                "select 1 from twistedlrp_job where state = 'running' and node = 'jobs-1'"
            ),
            30,
            0.02,
            "jobs-1 runs a job",
        )
        cut = time.monotonic()
        site.network.cut("jobs1", True)
        ages = []

        def heartbeat_age():
            rows = site.pg.query(
                "select extract(epoch from now() - heartbeat_at) from twistedlrp_node "
                "where name = 'jobs-2'"
            )
            ages.append(float(rows[0][0]) if rows else float("inf"))
            return time.monotonic() - cut >= LINK_CUT

        wait_for(heartbeat_age, LINK_CUT + 5, 0.5, "the cut's end")
        site.network.cut("jobs1", False)
        back = time.monotonic()
        load.wait_for("submit", len(load.of("submit")) + 3)
    during = load.of("submit", since=cut, until=back)
    assert not failures(load.records), failures(load.records)
    report("link cut: slowest submission during it (s)", round(max(r["took"] for r in during), 3))
    report("link cut: jobs-2's oldest heartbeat during it (s)", round(max(ages), 1))
    assert max(ages) < 10, ages
    finished = site.wait_finished(load.jobs())
    report("link cut: all its jobs finished, after the link came back (s)",
           round(time.monotonic() - back, 1))  # fmt: skip
    twice = {j: v for j, v in finished.items() if v[0] != "succeeded" or v[1] != 1}
    assert not twice, twice
    after = site.batches()
    new = {b: n for b, n in after.items() if b not in before}
    # One batch per run: as many new batches as jobs, each whole.
    assert len(new) == len(finished), (len(new), len(finished))
    assert set(new.values()) == {5000}, new
    assert {v[3]["batch"] for v in finished.values()} == set(new)
    assert "fenc" not in jobs2.output().lower(), jobs2.output()[-3000:]
    report("link cut: jobs run", f"{len(finished)} ({ran_once_before} batches before), each once")
    report("link cut phase took (s)", round(time.monotonic() - phase, 1))
    for web in ("web1", "web2"):
        site.wait_links(web, "up", "up", timeout=30)
    site.idle()

    # 3. PostgreSQL stopped and started again, submissions going on.
    phase = time.monotonic()
    site.idle()
    down = time.monotonic()
    site.pg.stop("fast")
    with Load(site.client, pages=0, every=0.5, submitters=2) as load:
        # Each job node says it is degraded, and is healthy again once it is back.
        for name in ("jobs1", "jobs2"):
            wait_for(lambda n=name: site.health(n)[0] == 503, DB_OUTAGE, 0.1, f"{name} degraded")
        degraded = time.monotonic() - down
        wait_for(lambda: time.monotonic() - down >= DB_OUTAGE, DB_OUTAGE + 1, 0.25, "outage")
        site.pg.start()
        up = time.monotonic()
        for name in ("jobs1", "jobs2"):
            wait_for(lambda n=name: site.health(n)[0] == 200, 30, 0.1, f"{name} healthy")
        healthy = time.monotonic() - up
        load.wait_for("submit", len(load.of("submit")) + 4)
    refused = [r for r in load.records if r["status"] == 503]
    # Refused in time, and so for certain: "not stored", never "may or may not".
    assert all(b"not stored" in r["body"] for r in refused), refused
    assert not any(b"may or may not" in r["body"] for r in refused), refused
    assert not failures(load.records, (202, 503)), failures(load.records, (202, 503))
    finished = site.wait_finished(load.jobs())
    assert {v[0] for v in finished.values()} == {"succeeded"}, finished
    report("database restart: submissions stored / refused",
           f"{len(load.jobs())} / {len(refused)} (outage {up - down:.1f} s)")  # fmt: skip
    report(
        "database restart: slowest submission (s)", round(max(r["took"] for r in load.records), 2)
    )
    stored = [r["took"] for r in load.records if r["status"] == 202]
    report("database restart: slowest stored submission (s)", round(max(stored), 2))
    report(
        "database restart: job nodes degraded after / healthy again after (s)",
        f"{degraded:.1f} / {healthy:.1f}",
    )
    report("database restart phase took (s)", round(time.monotonic() - phase, 1))
    site.idle()

    # 4. Rolling restart of the web nodes behind nginx, each drained first.
    phase = time.monotonic()
    with Load(site.client, pages=2, every=1.0) as load:
        load.wait_for("submit", 3)
        for web in ("web1", "web2"):
            t0 = time.monotonic()
            site.reload_nginx(down=web)
            wait_for(lambda web=web: site.established(web) == 0, 30, 0.05, f"{web} drained")
            drained = time.monotonic() - t0
            site.nodes[web].stop()
            assert site.nodes[web].proc.returncode == 0, site.nodes[web].output()[-3000:]
            site.nodes[web].start()
            site.wait_healthy(web)
            site.wait_links(web, "up", "up")
            site.reload_nginx(down=None)
            report(f"rolling restart: {web} drained in (s)", round(drained, 2))
            report(f"rolling restart: {web} out of nginx for (s)", round(time.monotonic() - t0, 2))
        load.wait_for("submit", len(load.of("submit")) + 3)
    assert not failures(load.records), failures(load.records)
    report("rolling restart: requests", f"{len(load.records)}, none failed")
    site.wait_finished(load.jobs())
    report("rolling restart phase took (s)", round(time.monotonic() - phase, 1))
    report("whole test (s)", round(time.monotonic() - started, 1))
