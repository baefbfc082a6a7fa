"""
The commands and configuration files of docs/deploying.md ("Several
machines") work as written: the shell lines that make the shared secret,
then the job node's and the web node's TOML files, read from the document
itself. Only what names a machine is replaced: addresses by 127.0.0.1,
ports by free ones, /etc/lrp by a temporary directory, mysite.settings by
the test site, and 8 workers by 2 (to keep the suite fast). On PostgreSQL
(LRP_TEST_POSTGRES) the "second job node" file runs too, beside the
first, and both nodes run jobs of one web node, which names both (the
"several job nodes" web node file).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from deploydoc import block, commands
from jobsupport import api, rows, shared_db, wait_job

from support import LRPProcess, port_open, postgres, request, wait_for


class Machines:
    """Where the document's machines are, on this one."""

    def __init__(self, tmp: Path):
        self.etc = tmp / "etc-lrp"
        self.etc.mkdir()
        self.ports = {}

    def port(self, name: str) -> int:
        from support import free_port

        return self.ports.setdefault(name, free_port())

    def localise(self, text: str) -> str:
        jobs_1, jobs_2, web = self.port("jobs-1"), self.port("jobs-2"), self.port("web")
        for old, new in [
            ("tcp:8001:interface=10.0.0.5", f"tcp:{jobs_1}:interface=127.0.0.1"),
            ("tcp:8001:interface=10.0.0.6", f"tcp:{jobs_2}:interface=127.0.0.1"),
            ("tcp:9101:interface=10.0.0.5", f"tcp:{self.port('health-1')}:interface=127.0.0.1"),
            ("tcp:9101:interface=10.0.0.6", f"tcp:{self.port('health-2')}:interface=127.0.0.1"),
            ("tcp:10.0.0.5:8001", f"tcp:127.0.0.1:{jobs_1}"),
            ("tcp:10.0.0.6:8001", f"tcp:127.0.0.1:{jobs_2}"),
            ("tcp:8000:interface=10.0.0.11", f"tcp:{web}:interface=127.0.0.1"),
            ("/etc/lrp", str(self.etc)),
            ('"mysite.settings"', '"testsite.settings"'),
            ("workers = 8", "workers = 2"),
        ]:
            text = text.replace(old, new)
        # Every address of the document's machines is replaced (the load
        # balancer's, 10.0.0.2, only names who may send forwarded headers).
        assert not re.search(r"10\.0\.0\.(?!2\b)", text), text
        return text

    def write(self, name: str, text: str) -> Path:
        path = self.etc / name
        path.write_text(self.localise(text))
        return path


def start_job_node(machines: Machines, db: Path, tmp: Path, config: Path, port: int) -> LRPProcess:
    tmp.mkdir()
    node = LRPProcess(
        "--config", str(config), settings=None, listen=False, tmp=tmp, env={"LRP_TEST_DB": str(db)}
    )
    node.start(wait=False)
    wait_for(
        lambda: port_open(port) or node.proc.poll() is not None, 60, message="the job node listens"
    )
    assert node.proc.poll() is None, node.output()
    return node


def test_the_documented_secret_job_node_and_web_node_work(template, tmp_path):
    machines = Machines(tmp_path)
    make_secret, protect = commands("head -c 32 /dev/urandom", "chmod 600")
    for command in (make_secret, protect):
        subprocess.run(["bash", "-ec", machines.localise(command)], check=True, timeout=30)
    secret = machines.etc / "jobs.secret"
    assert len(secret.read_text().strip()) >= 40 and secret.stat().st_mode & 0o077 == 0

    db = shared_db(template, tmp_path)
    job_config = machines.write("job-node.toml", block("toml", "/etc/lrp/lrp.toml on the job node"))
    web_block = "/etc/lrp/lrp.toml on each web node"
    if postgres():
        web_block += ", with several job nodes"
    web_config = machines.write("web-node.toml", block("toml", web_block))
    nodes = [start_job_node(machines, db, tmp_path / "job-1", job_config, machines.port("jobs-1"))]
    web = LRPProcess(
        "--config",
        str(web_config),
        settings=None,
        listen=False,
        tmp=tmp_path / "web",
        env={"LRP_TEST_DB": str(db)},
    )
    web.port = machines.port("web")
    web.tmp.mkdir()
    try:
        if postgres():
            second = machines.write(
                "job-node-2.toml", block("toml", "/etc/lrp/lrp.toml on a second job node")
            )
            nodes.append(
                start_job_node(machines, db, tmp_path / "job-2", second, machines.port("jobs-2"))
            )
        web.start()
        ids = [
            api(web, "submit", name="testapp.jobs.add", args=[i, 1])["job"]["id"] for i in range(12)
        ]
        for i, job_id in enumerate(ids):
            info = wait_job(web, job_id)
            assert (info["state"], info["result"]) == ("succeeded", i + 1), info
        names = {r[0] for r in rows(db, "select name from twistedlrp_node")}
        assert len(names) == len(nodes) and (not postgres() or "jobs-2" in names), names
        # Its health shows the job link: to the first job node, each listed node up.
        link = request(web.port, "/-/health").json()["job_link"]
        assert link["node"] == f"tcp:127.0.0.1:{machines.port('jobs-1')}", link
        assert [n["state"] for n in link["nodes"]] == ["up"] * len(nodes), link
        # The web node reached the job node over TCP with the secret, not a
        # job service of its own: it has none.
        assert "Job service ready" not in web.output()
        assert "Job service ready" in nodes[0].output()
    finally:
        web.stop()
        for node in nodes:
            node.stop(timeout=60)
