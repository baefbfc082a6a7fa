"""
A real third-party site: a stock Wagtail site (``wagtail start``) served by
``twistd -n lrp`` with twistedlrp's ``django.tasks`` backend, driven through
the admin's own forms by an HTTP client that keeps its cookies and sends the
CSRF token, as a browser does.

The site's settings change only as our docs say: ``"twistedlrp"`` in
``INSTALLED_APPS`` and ``TASKS`` naming ``LRPBackend`` (on PostgreSQL, also
``DATABASES`` in the ``mysite/settings/local.py`` that Wagtail's ``dev.py``
imports). Publishing a page must answer at once with the admin's redirect,
the page must be live, and every task Wagtail enqueued for it must have run
in a worker process and succeeded.

Needs wagtail (``make test-wagtail`` installs the ``thirdparty`` extra);
runs on SQLite, and on PostgreSQL too when LRP_TEST_POSTGRES is set.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from support import pg_connect, pg_ensure, postgres, wait_for

pytest.importorskip(
    "wagtail", reason="wagtail is not installed (make test-wagtail installs the thirdparty extra)"
)

BIN = Path(sys.executable).parent
# A publish hangs 10 s, then answers 500, when the job submission waits on the
# view's own transaction: anything close to a second is already wrong.
PUBLISH_BOUND = 3.0
FINISHED = {"succeeded", "failed", "cancelled"}
# What a stock site's publish enqueues (Wagtail 8): the search index update of
# a third-party app (modelsearch), and Wagtail's own reference index update.
EXPECTED_TASKS = {
    "modelsearch.tasks.insert_or_update_object_task",
    "wagtail.tasks.update_reference_index_task",
}
ADMIN = {"username": "admin", "password": "a-long-test-password-17", "email": "admin@example.com"}


# -- the site -----------------------------------------------------------------


class WagtailSite:
    """A C{wagtail start} site in C{path}, on SQLite or on a PostgreSQL database."""

    def __init__(self, path: Path, database: str):
        self.path = path
        self.database = database
        self.pg_key = path.parent / "postgres-db"
        self.env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}

    def create(self) -> None:
        # One `wagtail start` costs 0.3 s; the migrations (10-20 s) are the
        # cost, and a site on SQLite cannot share them with one on PostgreSQL.
        self.path.mkdir(parents=True)
        self.run(str(BIN / "wagtail"), "start", "mysite", str(self.path))
        settings = self.path / "mysite" / "settings"
        # What docs/jobs.md and the README ask of a site; nothing else.
        with open(settings / "base.py", "a") as f:
            f.write(
                "\n# twistedlrp (README, docs/jobs.md)\n"
                'INSTALLED_APPS += ["twistedlrp"]\n'
                'TASKS = {"default": {"BACKEND": "twistedlrp.tasks.LRPBackend"}}\n'
            )
        if self.database == "postgresql":
            from psycopg.conninfo import conninfo_to_dict

            pg = conninfo_to_dict(postgres())
            database = {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": pg_ensure(self.pg_key),
                "USER": pg.get("user", ""),
                "PASSWORD": pg.get("password", ""),
                "HOST": pg.get("host", ""),
                "PORT": pg.get("port", ""),
            }
            # dev.py ends with `from .local import *`: Wagtail's place for them.
            (settings / "local.py").write_text(f"DATABASES = {{'default': {database!r}}}\n")
        self.manage("migrate", "--noinput", "-v0")
        self.manage(
            "createsuperuser",
            "--noinput",
            env={f"DJANGO_SUPERUSER_{k.upper()}": v for k, v in ADMIN.items()},
        )

    def run(self, *command: str, env: dict | None = None) -> None:
        done = subprocess.run(
            command,
            cwd=self.path if self.path.exists() else None,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, (
            f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )

    def manage(self, *args: str, env: dict | None = None) -> None:
        self.run(sys.executable, "manage.py", *args, env=env)

    def jobs(self) -> list[dict]:
        """@return: the rows of the site's job table, oldest first."""
        columns = ["id", "name", "state", "worker", "attempts", "error", "created_at"]
        sql = f"select {', '.join(columns)} from twistedlrp_job order by created_at"
        if self.database == "postgresql":
            with pg_connect(self.pg_key, autocommit=True) as con:
                rows = con.execute(sql).fetchall()
        else:
            con = sqlite3.connect(f"file:{self.path / 'db.sqlite3'}?mode=ro", uri=True, timeout=20)
            try:
                rows = con.execute(sql).fetchall()
            finally:
                con.close()
        return [dict(zip(columns, (str(row[0]), *row[1:]), strict=True)) for row in rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request, tmp_path):
    if request.param == "postgresql" and not postgres():
        pytest.skip(
            "the PostgreSQL run needs LRP_TEST_POSTGRES (make test-wagtail LRP_TEST_POSTGRES=...)"
        )
    site = WagtailSite(tmp_path / "site", request.param)
    site.create()
    return site


# -- a browser without JavaScript ---------------------------------------------


class Form:
    """A form's action, method, fields (in document order) and submit buttons."""

    def __init__(self, attrs: dict):
        self.id = attrs.get("id")
        self.action = attrs.get("action") or ""
        self.method = (attrs.get("method") or "get").lower()
        self.fields: list[list] = []  # [name, value, kind]
        self.buttons: dict[str, str] = {}

    @property
    def names(self) -> set[str]:
        return {name for name, _, _ in self.fields}

    def fill(self, values: dict, submit: str | None = None) -> list[tuple[str, str]]:
        """@return: the pairs a browser sends once a user typed C{values} and pressed C{submit}."""
        unknown = set(values) - self.names
        assert not unknown, f"the form has no field {sorted(unknown)}: it has {sorted(self.names)}"
        pairs = [(name, values.get(name, value)) for name, value, _ in self.fields]
        if submit is not None:
            assert submit in self.buttons, f"no {submit!r} button: {sorted(self.buttons)}"
            pairs.append((submit, self.buttons[submit]))
        return pairs


class FormParser(HTMLParser):
    """Every form of a page and what a browser would submit of it (HTML's rules, no scripts)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self._by_id: dict[str, Form] = {}
        self._current: Form | None = None
        self._textarea: list | None = None
        self._select: list | None = None  # [form, name, multiple, options, selected]

    def _owner(self, attrs: dict) -> Form | None:
        if attrs.get("form"):
            return self._by_id.get(attrs["form"])
        return self._current

    def handle_starttag(self, tag, attrs):
        attrs = {k: ("" if v is None else v) for k, v in attrs}
        if tag == "form":
            self._current = Form(attrs)
            self.forms.append(self._current)
            if self._current.id:
                self._by_id[self._current.id] = self._current
            return
        form = self._owner(attrs)
        if form is None or "disabled" in attrs:
            return
        name = attrs.get("name")
        if tag == "input" and name:
            kind = attrs.get("type", "text").lower()
            if kind in ("submit", "image"):
                form.buttons[name] = attrs.get("value", "")
            elif kind in ("checkbox", "radio"):
                if "checked" in attrs:
                    form.fields.append([name, attrs.get("value", "on"), kind])
            elif kind not in ("button", "reset", "file"):
                form.fields.append([name, attrs.get("value", ""), kind])
        elif tag == "button" and name and attrs.get("type", "submit").lower() == "submit":
            form.buttons[name] = attrs.get("value", "")
        elif tag == "textarea" and name:
            self._textarea = [name, "", form]
        elif tag == "select" and name:
            self._select = [form, name, "multiple" in attrs, [], []]
        elif tag == "option" and self._select is not None:
            value = attrs.get("value")
            self._select[3].append(value)
            if "selected" in attrs:
                self._select[4].append(value)

    def handle_data(self, data):
        if self._textarea is not None:
            self._textarea[1] += data

    def handle_endtag(self, tag):
        if tag == "form":
            self._current = None
        elif tag == "textarea" and self._textarea is not None:
            name, text, form = self._textarea
            # HTML drops the newline right after <textarea>.
            form.fields.append([name, text[1:] if text.startswith("\n") else text, "textarea"])
            self._textarea = None
        elif tag == "select" and self._select is not None:
            form, name, multiple, options, selected = self._select
            if not selected and not multiple and options:
                selected = options[:1]
            for value in selected:
                form.fields.append([name, value or "", "select"])
            self._select = None


class Browser:
    """Cookies, the CSRF token of each form, Origin and Referer; redirects not followed."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

        class NoRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.cookies), NoRedirects
        )

    def open(self, path: str, data: list | None = None, referer: str | None = None):
        """@return: (status, Location header, body text) of one request."""
        headers = {"User-Agent": "twistedlrp-tests"}
        if data is not None:
            headers["Origin"] = self.base
            headers["Referer"] = referer or self.base + path
            data = urllib.parse.urlencode(data).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            response = self.opener.open(req, timeout=30)
        except urllib.error.HTTPError as e:
            response = e
        with response:
            body = response.read().decode("utf-8", "replace")
        return response.status, response.headers.get("Location"), body

    def get(self, path: str) -> tuple[int, str | None, str]:
        return self.open(path)

    def form(self, path: str, has_field: str) -> tuple[Form, str]:
        """@return: the form of page C{path} that has the field C{has_field}, and its action's path."""
        status, location, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {location}\n{body[-2000:]}"
        parser = FormParser()
        parser.feed(body)
        parser.close()
        forms = [f for f in parser.forms if has_field in f.names]
        assert len(forms) == 1, f"GET {path}: {len(forms)} forms with a {has_field!r} field"
        action = urllib.parse.urljoin(self.base + path, forms[0].action)
        return forms[0], urllib.parse.urlsplit(action).path

    def submit(self, page: str, form: Form, action: str, pairs: list):
        assert form.method == "post", form.method
        return self.open(action, data=pairs, referer=self.base + page)


# -- the test -----------------------------------------------------------------


def error_lines(log: str) -> list[str]:
    """@return: the exception lines (the last line of each traceback) of a server log."""
    return [
        line.strip()
        for line in log.splitlines()
        # A dotted class path (django.tasks.exceptions.InvalidTask: ...), or a
        # bare name of an error (ValueError: ...).
        if re.match(r"\s*((?:[a-z_]\w*\.)+(?:[A-Z]\w*\.)*[A-Z]\w*|\w*(Error|Exception)): \S", line)
    ]


def describe(jobs: list[dict]) -> str:
    lines = []
    for job in jobs:
        error = job["error"].strip().splitlines()[-1:] if job["error"] else []
        lines.append(
            f"  {job['name']} {job['state']} worker={job['worker']!r} "
            f"attempts={job['attempts']} {' '.join(error)}"
        )
    return "\n".join(lines) or "  (none)"


@pytest.mark.timeout(300)
def test_publish_a_page_through_the_admin(site, lrp_server, request):
    # The site's own settings say where its database is, not the test site's.
    server = lrp_server(
        settings="mysite.settings.dev", cwd=site.path, wait=False, env={"LRP_TEST_POSTGRES": ""}
    )
    try:
        server.wait_ready(60)
        check_publish(site, server)
    finally:
        # Shown by pytest when the test fails (and by -rP when it passes).
        try:
            jobs = describe(site.jobs())
        except Exception as e:
            jobs = f"not readable: {e!r}"
        request.node.add_report_section("call", f"jobs on {site.database}", jobs)
        tail = "\n".join(server.output().splitlines()[-80:])
        request.node.add_report_section("call", "server log (tail)", tail)


def check_publish(site: WagtailSite, server) -> None:
    browser = Browser(server.port)

    # Log in through the admin's own form.
    form, action = browser.form("/admin/login/", has_field="username")
    pairs = form.fill({"username": ADMIN["username"], "password": ADMIN["password"]})
    status, location, body = browser.submit("/admin/login/", form, action, pairs)
    assert status == 302 and location == "/admin/", f"login: {status} {location}\n{body[-2000:]}"
    assert "sessionid" in {c.name for c in browser.cookies}

    # The site's home page, from the explorer, and the form to add a child to it.
    status, _, body = browser.get("/admin/pages/")
    assert status == 200, status
    editable = set(re.findall(r'href="/admin/pages/(\d+)/edit/', body))
    assert len(editable) == 1, f"expected the home page alone under the root: {editable}"
    home = editable.pop()
    status, location, body = browser.get(f"/admin/pages/{home}/add_subpage/")
    if status == 302:  # one page type may go there: straight to its form
        add = location
    else:
        assert status == 200, status
        add = re.search(rf'href="(/admin/pages/add/[\w/]+/{home}/)"', body).group(1)
    form, action = browser.form(add, has_field="title")
    title = f"Published by twistedlrp on {site.database}"
    slug = f"lrp-{site.database}"
    pairs = form.fill({"title": title, "slug": slug}, submit="action-publish")

    before = {job["id"] for job in site.jobs()}
    started = time.monotonic()
    status, location, body = browser.submit(add, form, action, pairs)
    answered = time.monotonic() - started
    errors = error_lines(server.output())
    assert status == 302, (
        f"publish answered {status} after {answered:.2f} s, not the admin's redirect; "
        f"server errors: {errors}\n{body[-1500:] if status != 500 else ''}"
    )
    assert answered < PUBLISH_BOUND, f"publish took {answered:.2f} s; server errors: {errors}"
    assert location.startswith("/admin/pages/"), location

    status, _, body = browser.get(f"/{slug}/")
    assert status == 200 and title in body, f"GET /{slug}/: {status}"

    # Every task the publish enqueued ran in a worker and succeeded.
    def all_finished():
        jobs = [job for job in site.jobs() if job["id"] not in before]
        return jobs if jobs and all(job["state"] in FINISHED for job in jobs) else None

    jobs = wait_for(all_finished, 60, interval=0.1, message="the publish's jobs to finish")
    bad = [job for job in jobs if job["state"] != "succeeded" or not job["worker"]]
    assert not bad, f"jobs that did not succeed in a worker:\n{describe(bad)}"
    names = {job["name"] for job in jobs}
    assert EXPECTED_TASKS <= names, f"expected {sorted(EXPECTED_TASKS)}, saw {sorted(names)}"
