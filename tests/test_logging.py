"""
The server log against real servers: ``--log-format json`` (every line of
the main process, the web processes and the reload supervisor and child is
one JSON object), the job lines and their fields, ``--log-level``, Django's
lines printed once, and the access log's duration.
"""

from __future__ import annotations

import json
import re

import pytest
from jobsupport import api, start_server, wait_job

from support import run_to_exit, wait_for


def json_lines(output: str) -> list[dict]:
    """@return: every line of C{output} as JSON (a line that is not fails the test)."""
    records = []
    for line in output.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{output}") from None
    return records


def find(records: list[dict], **fields) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]


def test_json_log_has_one_object_a_line_with_the_jobs_fields(template, tmp_path):
    server = start_server(
        template,
        tmp_path / "server",
        "--log-format",
        "json",
        "--access-log",
        "-",
        "--access-log-format",
        "combined+duration",
    )
    try:
        ok = api(server, "submit", name="testapp.jobs.add", args=[1, 2])["job"]
        bad = api(server, "submit", name="testapp.jobs.fail")["job"]
        assert wait_job(server, ok["id"])["state"] == "succeeded"
        assert wait_job(server, bad["id"])["state"] == "failed"
        assert server.get("/hello").status == 200

        def logged():
            records = json_lines(server.output())
            done = find(records, job_id=ok["id"], namespace="twistedlrp.jobs", level="info")
            failed = find(records, job_id=bad["id"], level="warn")
            access = find(records, namespace="twistedlrp.access", uri="/hello")
            return (records, done, failed, access) if len(done) == 2 and failed and access else None

        records, (started, succeeded), (failed,), (access,) = wait_for(logged, 10)
    finally:
        server.stop()
    records = json_lines(server.output())
    for record in records:
        assert {"time", "level", "namespace", "message", "pid"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
    assert started["name"] == "testapp.jobs.add" and started["attempt"] == 1
    assert re.fullmatch(
        rf"job testapp\.jobs\.add {ok['id']} started \(attempt 1 of 1\) on worker \d+",
        started["message"],
    )
    assert isinstance(started["worker"], int)
    assert succeeded["name"] == "testapp.jobs.add"
    assert 0 <= succeeded["duration"] < 30
    assert succeeded["message"] == (
        f"job testapp.jobs.add {ok['id']} succeeded in {succeeded['duration']:.3f} s"
    )
    assert failed["name"] == "testapp.jobs.fail" and failed["duration"] >= 0
    assert failed["error"] == "ValueError: this job fails on purpose"
    assert access["status"] == 200 and access["method"] == "GET" and access["duration"] >= 0
    assert re.search(r'"GET /hello HTTP/1.1" 200 \d+ "-" "[^"]*" rt=\d+\.\d{3}$', access["message"])
    assert "line" not in access  # the message says it already
    assert find(records, namespace="twistedlrp.server", message="twistedlrp stopped")


def test_log_level_warn_hides_info_lines(template, tmp_path):
    server = start_server(template, tmp_path / "server", "--log-level", "warn")
    try:
        ok = api(server, "submit", name="testapp.jobs.add", args=[2, 3])["job"]
        bad = api(server, "submit", name="testapp.jobs.fail")["job"]
        assert wait_job(server, ok["id"])["state"] == "succeeded"
        assert wait_job(server, bad["id"])["state"] == "failed"
        wait_for(lambda: f"job testapp.jobs.fail {bad['id']} failed" in server.output(), 10)
    finally:
        server.stop()
    output = server.output()
    assert "#warn] job testapp.jobs.fail" in output
    assert "#info]" not in output and "succeeded in" not in output, output
    assert "twistedlrp running" not in output


def test_log_level_debug_shows_debug_lines(template, tmp_path):
    server = start_server(template, tmp_path / "server", "--log-level", "debug", "--workers", "1")
    try:
        wait_for(lambda: re.search(r"#debug\] Worker \d+ ready", server.output()), 20)
    finally:
        server.stop()


@pytest.mark.parametrize("args", [[], ["--web-workers", "2"]], ids=["one-process", "web-workers"])
def test_a_django_log_line_appears_once(lrp_server, args):
    # DEBUG = True: Django's own console handler would print the line to
    # standard error besides the server log.
    server = lrp_server("--no-jobs", *args, env={"LRP_TEST_DEBUG": "1"})
    assert server.get("/no-such-page").status == 404
    wait_for(lambda: "Not Found: /no-such-page" in server.output(), 10)
    server.stop()
    output = server.output()
    assert output.count("Not Found: /no-such-page") == 1, output
    assert "[django.request#warn] Not Found: /no-such-page" in output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--log-level", "loud"],
            "--log-level: expected one of debug, info, warn, error, got 'loud'",
        ),
        (["--log-format", "xml"], "--log-format: expected text or json, got 'xml'"),
        (
            ["--access-log-format", "common"],
            "--access-log-format: expected combined or combined+duration, got 'common'",
        ),
    ],
)
def test_a_bad_logging_option_is_a_clear_error(args, message):
    code, output = run_to_exit(*args)
    assert code == 1
    assert f"twistd lrp: error: {message}" in output


def test_access_log_file_with_and_without_duration(lrp_server, tmp_path):
    plain, timed = tmp_path / "plain.log", tmp_path / "timed.log"
    first = lrp_server("--no-jobs", "--access-log", str(plain))
    second = lrp_server(
        "--no-jobs", "--access-log", str(timed), "--access-log-format", "combined+duration"
    )
    assert first.get("/hello").status == 200
    assert second.get("/hello").status == 200
    first.stop()
    second.stop()
    combined = r'127\.0\.0\.1 - - \[[^]]+\] "GET /hello HTTP/1\.1" 200 \d+ "-" "[^"]*"'
    # The last line: the readiness checks asked for /-/health before.
    assert re.fullmatch(combined, plain.read_text().splitlines()[-1])
    assert re.fullmatch(combined + r" rt=\d+\.\d{3}", timed.read_text().splitlines()[-1])


def test_json_log_of_web_processes(lrp_server):
    server = lrp_server("--web-workers", "2", "--no-jobs", "--log-format", "json")
    assert server.get("/hello").status == 200
    # One web process answers before the other is up; the main process says when both are.
    wait_for(lambda: "web processes of 8 threads each" in server.output(), 20)
    server.stop()
    records = json_lines(server.output())
    main = [r for r in records if r["message"].startswith("twistedlrp running (pid")]
    pids = {r["pid"] for r in records if r["message"].startswith("twistedlrp web process running")}
    assert len(pids) == 2, records
    assert main and main[0]["pid"] not in pids


def test_json_log_of_the_reload_supervisor_and_its_server(lrp_server):
    server = lrp_server("--reload", "--no-jobs", "--log-format", "json")
    assert server.get("/hello").status == 200
    server.stop()
    records = json_lines(server.output())
    assert find(records, namespace="twistedlrp.reload")
    running = [r for r in records if r["message"].startswith("twistedlrp running")]
    assert running and running[0]["pid"] != server.proc.pid


def test_json_log_goes_to_twistds_logfile(lrp_server, tmp_path):
    path = tmp_path / "lrp.log"
    server = lrp_server(
        "--no-jobs",
        "--log-format",
        "json",
        "--log-level",
        "warn",
        twistd_args=("--logfile", str(path)),
    )
    assert server.get("/nope").status == 404
    wait_for(lambda: path.exists() and "Not Found: /nope" in path.read_text(), 10)
    server.stop()
    records = json_lines(path.read_text())
    assert find(records, namespace="django.request", level="warn", message="Not Found: /nope")
    assert all(r["level"] != "info" for r in records)
    assert "Not Found" not in server.output()


@pytest.mark.parametrize("level", ["info", "warn"])
def test_a_jobs_stdlib_records_reach_the_log_at_their_level(template, tmp_path, level):
    server = start_server(
        template,
        tmp_path / "server",
        "--log-level",
        level,
        "--log-format",
        "json",
        "--workers",
        "1",
    )
    try:
        job = api(server, "submit", name="testapp.jobs.log_records", args=["m1"])["job"]
        info = wait_job(server, job["id"])
        assert info["state"] == "succeeded", info
        wait_for(lambda: "error: m1" in server.output(), 10)
    finally:
        server.stop()
    records = find(json_lines(server.output()), namespace="testapp.jobs", job_id=job["id"])
    by_level = {r["level"]: r["message"] for r in records}
    assert by_level.pop("warn") == "warning: m1"
    assert by_level.pop("error") == "error: m1"
    assert by_level == ({"info": "info: m1"} if level == "info" else {})
    # The job's output keeps them, readable, with the traceback and its prints.
    assert "WARNING testapp.jobs: warning: m1" in info["output"]
    assert "KeyError: 'm1'" in info["output"] and "printed: m1" in info["output"]
