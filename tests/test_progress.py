"""
The live job progress widget through a real server: a page rendered with
{% lrp_job_progress %} (it works without JavaScript), its Server-Sent
Events stream from the reactor (read by a real HTTP client while a gated
job steps forward), its JSON status view, its cancel button, and the
signed token that every one of them checks.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest
from jobsupport import api, start_server, wait_job
from progresssupport import EventStream, Job, Page, forged_token, progress_server, streams_open

from support import ROOT, request, run_to_exit, wait_for


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from progress_server(tmp_path_factory)


def test_the_stream_pushes_each_step_then_the_end(env):
    server, _, base = env
    job = Job(server, base)
    page = Page(server, job.id)
    assert page.events_url.startswith(f"/-/jobs/{job.id}/events?token=")
    stream = EventStream(server.port, page.events_url)
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-store"
        assert stream.next_block() == {"retry": ["2000"]}
        first = stream.until(lambda data: True)
        assert first["id"] == job.id and first["state"] in ("queued", "running")
        assert first["progress"]["current"] == 0 and not first["finished"]
        # Its start is pushed too (the worker may still be starting).
        stream.until(lambda data: data["state"] == "running")
        for n in (1, 2):
            job.step()
            stepped = time.monotonic()
            data = stream.until(lambda data, n=n: data["progress"]["current"] == n)
            # Pushed when the job reports it: the wait just asked would
            # otherwise answer only at its timeout, 2 s later.
            assert time.monotonic() - stepped < 1.0
            assert data["state"] == "running"
            assert data["progress"] == {
                "current": n,
                "total": 3,
                "message": f"step {n} of 3",
                "percent": round(100 * n / 3, 1),
            }
        job.step()
        stepped = time.monotonic()
        last = stream.until(lambda data: data["finished"])
        # The end arrives pushed by the job service's wait, not a second later.
        assert time.monotonic() - stepped < 3
        assert last["state"] == "succeeded" and last["result"] == {"steps": 3}
        assert last["progress"]["percent"] == 100.0
        # Then the stream ends (the response is finished; nothing more comes).
        assert stream.next_block() is None
    finally:
        stream.close()


def test_the_page_without_javascript_shows_state_and_progress(env):
    server, _, base = env
    job = Job(server, base)
    job.step()
    wait_for(lambda: api(server, "get", id=job.id)["job"]["progress"][0] == 1, 30, message="step 1")
    page = Page(server, job.id)
    text = page.text
    assert '<progress class="lrp-job-bar" max="3" value="1">33.3 %</progress>' in text
    assert '<span class="lrp-job-state">running</span>' in text
    assert '<p class="lrp-job-message">step 1 of 3</p>' in text
    assert f'action="/lrp/jobs/{job.id}/cancel"' in text
    assert 'name="csrfmiddlewaretoken"' in text
    assert f'name="next" value="/progress/{job.id}"' in text
    assert '<script src="/static/twistedlrp/progress.js" defer></script>' in text
    job.finish()
    wait_job(server, job.id)
    finished = Page(server, job.id).text
    assert '<span class="lrp-job-state">succeeded</span>' in finished
    assert 'max="3" value="3"' in finished
    # A finished job's cancel form is hidden.
    assert re.search(r'<form class="lrp-job-cancel"[^>]* hidden>', finished)


def test_a_finished_job_gets_one_event_and_the_end(env):
    server, _, base = env
    job = Job(server, base, count=1)
    job.finish()
    wait_job(server, job.id)
    stream = EventStream(server.port, Page(server, job.id).events_url)
    try:
        name, data = stream.next_event()
        assert name == "progress" and data["state"] == "succeeded" and data["finished"]
        assert stream.next_block() is None
    finally:
        stream.close()


def test_bad_tokens_are_refused_with_403(env):
    server, _, base = env
    job, other = Job(server, base, count=1), Job(server, base, count=1)
    try:
        page = Page(server, job.id)
        events = f"/-/jobs/{job.id}/events"
        cases = {
            "no token": events,
            "a forged token": f"{events}?token=" + page.token[:-3] + "abc",
            "another job's token": f"/-/jobs/{other.id}/events?token={page.token}",
            "an expired token": f"{events}?token=" + forged_token(job.id, age=6 * 3600 + 60),
            "another job's payload under this one's signature": f"/-/jobs/{other.id}/events?token="
            + forged_token(other.id).rsplit(":", 1)[0]
            + ":"
            + forged_token(job.id).rsplit(":", 1)[1],
        }
        for case, path in cases.items():
            response = request(server.port, path)
            assert response.status == 403, (case, response.status, response.text)
            assert response.text.startswith("Forbidden: "), (case, response.text)
        assert "expired" in request(server.port, cases["an expired token"]).text
        # A token the site made a moment ago (same key) is good: the forging is right.
        response_ok = EventStream(server.port, f"{events}?token={forged_token(job.id)}")
        assert response_ok.status == 200
        response_ok.close()
        # The status view and the cancel button check the token too.
        other_status = page.status_url.replace(job.id, other.id)
        assert request(server.port, other_status).status == 403
        assert request(server.port, f"/lrp/jobs/{job.id}/status").status == 403
        response = request(
            server.port,
            f"/lrp/jobs/{other.id}/cancel",
            method="POST",
            body=f"token={page.token}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status == 403 and response.json()["error"] == "the token is for another job"
        assert api(server, "get", id=other.id)["job"]["state"] != "cancelled"
        # Not a stream: other paths and methods under /-/jobs/.
        assert request(server.port, f"/-/jobs/{job.id}").status == 404
        assert request(server.port, page.events_url, method="POST", body=b"").status == 405
    finally:
        job.finish()
        other.finish()


def test_the_tag_on_an_unknown_job_and_without_its_urls(env):
    server, _, base = env
    unknown = str(uuid.uuid4())
    response = request(server.port, f"/progress/{unknown}")
    assert response.status == 200
    assert (
        '<div class="lrp-job lrp-job-missing"><span class="lrp-job-state">no such job</span>'
        in (response.text)
    )
    assert "data-events" not in response.text and "<script" not in response.text
    known = api(server, "add", a=1, b=2)["job"]["id"]
    response = request(server.port, f"/progress/{known}?no_urls=1")
    assert response.status == 500
    assert response.text == (
        "{% lrp_job_progress %} needs the URLs of twistedlrp.views: add "
        'path("lrp/", include("twistedlrp.urls")) to the URLconf'
    )


def test_a_page_for_one_user_gives_a_token_for_that_user_only(env):
    server, _, base = env
    job = Job(server, base, count=1)
    try:
        page = Page(server, job.id, "?user=7")
        # The status view runs as nobody here: the token was made for user 7.
        response = request(server.port, page.status_url)
        assert response.status == 403
        assert response.json() == {"error": "the token is for another user"}
        assert request(server.port, Page(server, job.id).status_url).status == 200
        # Without the request in the template's context, its "user" is the one.
        bare = Page(server, job.id, "?user=7&bare=1")
        assert request(server.port, bare.status_url).status == 403
        assert request(server.port, Page(server, job.id, "?bare=1").status_url).status == 200
        assert 'name="next" value=""' in bare.text
    finally:
        job.finish()


def test_the_status_view_answers_json(env):
    server, _, base = env
    job = Job(server, base, count=2)
    page = Page(server, job.id)
    job.step()
    data = wait_for(
        lambda: (
            (d := request(server.port, page.status_url).json())["progress"]["current"] == 1 and d
        ),
        30,
        message="step 1 in the status view",
    )
    assert data["id"] == job.id and data["state"] == "running" and not data["finished"]
    assert data["progress"]["message"] == "step 1 of 2"
    response = request(server.port, page.status_url)
    assert response.headers["cache-control"] == "no-store"
    job.finish()
    wait_job(server, job.id)
    assert request(server.port, page.status_url).json()["result"] == {"steps": 2}
    # A good token for a job the service does not know: 404.
    unknown = str(uuid.uuid4())
    response = request(server.port, f"/lrp/jobs/{unknown}/status?token={forged_token(unknown)}")
    assert response.status == 404, response.text
    # Only GET.
    assert request(server.port, page.status_url, method="POST", body=b"").status == 405


def test_the_cancel_button_cancels_and_returns_to_the_page(env):
    server, _, base = env
    job = Job(server, base)
    page = Page(server, job.id)
    stream = EventStream(server.port, page.events_url)
    try:
        stream.until(lambda data: True)
        wait_job(server, job.id, states=("running",))
        form = f"token={page.token}&next=/progress/{job.id}"
        response = request(
            server.port,
            page.cancel_url,
            method="POST",
            body=form.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        # Without JavaScript: back to the page.
        assert response.status == 303, response.text
        assert response.headers["location"] == f"/progress/{job.id}"
        last = stream.until(lambda data: data["finished"])
        assert last["state"] == "cancelled"
        assert stream.next_block() is None
    finally:
        stream.close()
    # The script's way: JSON back; a redirect elsewhere is refused (JSON instead).
    response = request(
        server.port,
        page.cancel_url,
        method="POST",
        body=f"token={page.token}&next=http://elsewhere.example/".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 200 and response.json()["state"] == "cancelled"


def test_a_client_that_goes_away_is_forgotten(env):
    server, _, base = env
    job = Job(server, base)
    try:
        page = Page(server, job.id)
        streams = [EventStream(server.port, page.events_url) for _ in range(3)]
        for stream in streams:
            stream.until(lambda data: True)
        assert streams_open(server) == 3
        for stream in streams:
            stream.close()
        wait_for(lambda: streams_open(server) == 0, 10, message="the streams forgotten")
        # And the server still streams.
        stream = EventStream(server.port, page.events_url)
        stream.until(lambda data: True)
        job.step()
        assert stream.until(lambda data: data["progress"]["current"] == 1)
        stream.close()
        assert "Traceback" not in server.output()
    finally:
        job.finish()


def test_the_stream_limit_and_open_streams_do_not_hold_the_shutdown(env, tmp_path):
    _, template, base = env
    server = start_server(
        template, tmp_path / "server", "--workers", "1", "--graceful-timeout", "20",
        env={"LRP_TEST_PROGRESS_MAX_STREAMS": "2"},
    )  # fmt: skip
    try:
        # Queued until next hour: its streams stay open, no job holds the shutdown.
        info = api(
            server, "submit", name="testapp.jobs.add", args=[1, 2], run_after=time.time() + 3600
        )["job"]
        page = Page(server, info["id"])
        streams = [EventStream(server.port, page.events_url) for _ in range(2)]
        for stream in streams:
            assert stream.status == 200
            assert stream.until(lambda data: True)["state"] == "queued"
        # A third is one too many: 503, and the widget polls instead.
        response = request(server.port, page.events_url)
        assert response.status == 503 and response.headers["retry-after"] == "5"
        assert request(server.port, page.status_url).status == 200
        started = time.monotonic()
        assert server.stop(timeout=15) == 0
        assert time.monotonic() - started < 8
        for stream in streams:
            # Each ended cleanly (end of the chunked body) rather than being cut.
            assert stream.next_block() is None
    finally:
        server.kill()


@pytest.mark.parametrize("value, shown", [("0", "0"), ("many", "'many'")])
def test_a_bad_stream_limit_stops_the_server_at_start(value, shown):
    code, output = run_to_exit(env={"LRP_TEST_PROGRESS_MAX_STREAMS": value})
    assert code != 0
    assert "twistd lrp: error: system check found 1 error" in output
    assert "twistedlrp.E102" in output
    assert f"LRP_PROGRESS_MAX_STREAMS must be a whole number of at least 1, not {shown}" in output


def test_the_script_and_template_are_package_data():
    package = ROOT / "twistedlrp"
    script = (package / "static" / "twistedlrp" / "progress.js").read_text()
    assert "new EventSource(" in script and "lrp:job" in script
    assert (package / "templates" / "twistedlrp" / "job_progress.html").is_file()
