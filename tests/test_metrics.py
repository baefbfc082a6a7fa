"""
The Prometheus metrics endpoint (/-/metrics) of real servers, its text
parsed with prometheus_client's own parser: requests and jobs counted as
they happen, gauges read at scrape time, the endpoint refused to other
addresses and absent with --no-metrics, and one sum over several web
processes and the main process (--web-workers 2).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from jobsupport import api, read_pid, start_server, wait_job
from prometheus_client.parser import text_string_to_metric_families

from support import free_port, port_open, request, run_to_exit, wait_for


def scrape(server, path: str = "/-/metrics", port: int | None = None) -> dict:
    """@return: {(sample name, sorted label items): value} of one scrape."""
    response = request(port or server.port, path, timeout=10)
    assert response.status == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, sample: str, **labels) -> float:
    return samples.get((sample, tuple(sorted(labels.items()))), 0.0)


def gets_2xx(samples: dict) -> float:
    return value(samples, "lrp_http_requests_total", method="GET", status="2xx")


def all_gets(samples: dict) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "lrp_http_requests_total" and ("method", "GET") in labels
    )


def test_requests_jobs_and_gauges(template, tmp_path):
    server = start_server(template, tmp_path, "--threads", "3", "--workers", "2")
    try:
        before = scrape(server)
        for _ in range(5):
            assert server.get("/hello").status == 200
        assert server.get("/no-such-page").status == 404
        assert request(server.port, "/hello", method="POST").status in (200, 403)
        after = scrape(server)
        # Exactly the requests made: the scrapes themselves are not counted.
        assert gets_2xx(after) - gets_2xx(before) == 5
        assert (
            value(after, "lrp_http_requests_total", method="GET", status="4xx")
            == value(before, "lrp_http_requests_total", method="GET", status="4xx") + 1
        )
        count = "lrp_http_request_duration_seconds_count"
        assert value(after, count) - value(before, count) == 7
        # Latency is measured: a view that sleeps 0.3 s lands above the 0.25 s bucket.
        assert server.get("/sleep?seconds=0.3").status == 200
        slow = scrape(server)
        bucket = "lrp_http_request_duration_seconds_bucket"
        assert value(slow, bucket, le="0.25") == value(after, bucket, le="0.25")
        assert value(slow, bucket, le="+Inf") == value(after, bucket, le="+Inf") + 1
        assert (
            value(slow, "lrp_http_request_duration_seconds_sum")
            - value(after, "lrp_http_request_duration_seconds_sum")
            >= 0.3
        )
        assert (
            value(after, "lrp_http_threads", state="busy")
            + value(after, "lrp_http_threads", state="idle")
            == 3
        )

        ok = api(server, "submit", name="testapp.jobs.add", args=[2, 3])["job"]
        bad = api(server, "submit", name="testapp.jobs.fail")["job"]
        assert wait_job(server, ok["id"])["state"] == "succeeded"
        assert wait_job(server, bad["id"])["state"] == "failed"
        jobs = scrape(server)
        assert value(jobs, "lrp_jobs_submitted_total", name="testapp.jobs.add") == 1
        assert value(jobs, "lrp_jobs_submitted_total", name="testapp.jobs.fail") == 1
        assert value(jobs, "lrp_jobs_succeeded_total", name="testapp.jobs.add") == 1
        assert value(jobs, "lrp_jobs_failed_total", name="testapp.jobs.fail") == 1
        assert value(jobs, "lrp_jobs_failed_total", name="testapp.jobs.add") == 0
        assert value(jobs, "lrp_job_run_seconds_count", name="testapp.jobs.add") == 1
        assert value(jobs, "lrp_job_store_batch_size_count") >= 1
        assert value(jobs, "lrp_jobs_queued") == 0
        workers = sum(value(jobs, "lrp_job_workers", state=s) for s in ("starting", "idle", "busy"))
        assert workers == 2
        assert value(jobs, "lrp_job_workers_rss_bytes") > 10 * 1024 * 1024
    finally:
        assert server.stop() == 0


def test_retried_and_cancelled_jobs_are_counted(template, tmp_path):
    server = start_server(template, tmp_path)
    try:
        marker = tmp_path / "marker"
        marker.mkdir()
        job = api(server, "submit", name="testapp.jobs.crash_with_retry", args=[str(marker)])
        # Its first attempt hangs: its worker is killed, the second attempt succeeds.
        os.kill(read_pid(marker / "crash_with_retry-attempts"), signal.SIGKILL)
        assert wait_job(server, job["job"]["id"])["state"] == "succeeded"
        samples = scrape(server)
        name = "testapp.jobs.crash_with_retry"
        assert value(samples, "lrp_jobs_retried_total", name=name) == 1
        assert value(samples, "lrp_jobs_succeeded_total", name=name) == 1
        assert value(samples, "lrp_job_run_seconds_count", name=name) == 2

        # A job cancelled while it waits in the queue (for its run_after).
        later = api(
            server, "submit", name="testapp.jobs.add", args=[1, 2], run_after=time.time() + 60
        )
        assert value(scrape(server), "lrp_jobs_queued") == 1
        assert api(server, "cancel", id=later["job"]["id"])["job"]["state"] == "cancelled"
        samples = scrape(server)
        assert value(samples, "lrp_jobs_cancelled_total", name="testapp.jobs.add") == 1
        assert value(samples, "lrp_jobs_queued") == 0
    finally:
        server.stop()


def test_refused_to_other_addresses(lrp_server):
    server = lrp_server("--proxy-headers", "--metrics-path", "/internal/metrics")
    assert server.get("/internal/metrics").status == 200
    # A client a trusted proxy (127.0.0.1) forwarded is not loopback.
    refused = server.get("/internal/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert refused.status == 403
    assert b"--metrics-allow-ips" in refused.body
    posted = request(server.port, "/internal/metrics", method="POST", body=b"")
    assert posted.status == 405
    # The default path is the application's now.
    assert server.get("/-/metrics").status == 404


def test_allowed_networks(lrp_server):
    server = lrp_server("--metrics-allow-ips", "10.0.0.0/8")
    assert server.get("/-/metrics").status == 403


def test_no_metrics(lrp_server):
    server = lrp_server("--no-metrics")
    response = server.get("/-/metrics")
    # The Django site's own 404 page: nothing answers that path.
    assert response.status == 404
    assert b"lrp_http" not in response.body


def test_bad_options():
    from twisted.python import usage

    from twistedlrp.options import Options

    with pytest.raises(usage.UsageError, match="--metrics-path /-/health is --health-path too"):
        Options().parseOptions(["--metrics-path", "/-/health"])
    with pytest.raises(usage.UsageError, match="--metrics-allow-ips: not an address or network"):
        Options().parseOptions(["--metrics-allow-ips", "10.0.0.0/8,nowhere"])
    with pytest.raises(usage.UsageError, match="--metrics-listen and --no-metrics exclude"):
        Options().parseOptions(["--metrics-listen", "tcp:9100", "--no-metrics"])
    options = Options()
    options.parseOptions(["--no-metrics", "--metrics-path", "/-/health"])
    assert options["no-metrics"]


def test_web_workers_share_one_sum(template, tmp_path):
    listen = free_port()
    server = start_server(
        template,
        tmp_path,
        "--web-workers",
        "2",
        "--threads",
        "2",
        "--metrics-listen",
        f"tcp:{listen}:interface=127.0.0.1",
    )
    try:
        before = scrape(server)
        # Requests until both web processes answered some (the kernel spreads them).
        pids: set[int] = set()
        made = 0

        def both():
            nonlocal made
            made += 1
            pids.add(server.get("/-/health").json()["pid"])
            return len(pids) == 2

        wait_for(both, timeout=30, interval=0, message="answers from both web processes")
        job = api(server, "submit", name="testapp.jobs.add", args=[1, 1])["job"]
        assert wait_job(server, job["id"])["state"] == "succeeded"
        after = scrape(server)
        # Exactly the health requests, whichever process answered each.
        assert all_gets(after) - all_gets(before) == made
        assert value(after, "lrp_http_requests_total", method="POST", status="2xx") >= 1
        # The job service runs in the main process: its counts reach the web process scraped.
        assert value(after, "lrp_jobs_succeeded_total", name="testapp.jobs.add") == 1
        # The main process's own listener merges the same files.
        main = scrape(server, port=listen)
        assert all_gets(main) == all_gets(after)
        assert value(main, "lrp_jobs_succeeded_total", name="testapp.jobs.add") == 1

        # Every web process's threads (2 each), refreshed within a second.
        def threads():
            samples = scrape(server)
            total = sum(value(samples, "lrp_http_threads", state=s) for s in ("busy", "idle"))
            return total == 4

        wait_for(threads, timeout=10, interval=0.2, message="4 threads in all")

        # A web process that dies takes its gauges, not its counts.
        counted = gets_2xx(scrape(server))
        os.kill(next(iter(pids)), signal.SIGKILL)
        wait_for(
            lambda: (
                len(
                    [
                        w
                        for w in server.get("/-/health").json()["web_workers"]["workers"]
                        if w["state"] == "running" and w["pid"] not in pids
                    ]
                )
                == 1
            ),
            timeout=30,
            interval=0.1,
            message="the web process restarted",
        )
        assert gets_2xx(scrape(server)) >= counted
        wait_for(threads, timeout=10, interval=0.2, message="4 threads again")
    finally:
        assert server.stop() == 0


def test_metrics_listen_on_a_jobs_only_node(template, tmp_path):
    port = free_port()
    node = start_server(
        template,
        tmp_path,
        "--jobs-only",
        "--workers",
        "2",
        "--metrics-listen",
        f"tcp:{port}:interface=127.0.0.1",
        listen=False,
        wait=False,
    )
    try:
        wait_for(lambda: port_open(port), timeout=30, message="the metrics listener")

        def workers():
            samples = scrape(node, port=port)
            ready = value(samples, "lrp_job_workers", state="idle") == 2
            return samples if ready else None

        samples = wait_for(workers, timeout=30, interval=0.1, message="2 idle workers")
        assert value(samples, "lrp_jobs_queued") == 0
        # No web server here, so no HTTP metrics.
        assert not [name for name, _ in samples if name.startswith("lrp_http")]
        # The health endpoint is served there too (the job service's section), nothing else.
        health = request(port, "/-/health")
        assert health.status == 200 and health.json()["jobs"]["workers"] == 2, health.text
        assert "threads" not in health.json()
        assert request(port, "/-/other").status == 404
        forwarded = request(port, "/-/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        assert forwarded.status == 200  # no --proxy-headers: the peer (loopback) is the client
    finally:
        assert node.stop() == 0


def test_a_metrics_directory_that_cannot_be_made(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "metrics").write_text("a file where the directory goes")
    code, output = run_to_exit("--web-workers", "2", "--state-dir", str(state))
    assert code != 0
    assert "cannot prepare the metrics directory" in output
    assert "Traceback" not in output
