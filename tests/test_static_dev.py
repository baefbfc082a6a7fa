"""
Development static files: with DEBUG = True and no STATIC_ROOT, STATIC_URL
is served through the django.contrib.staticfiles finders, as runserver
serves it (the admin of a fresh startproject site is styled), from the
reactor; without DEBUG nothing is.
"""

from __future__ import annotations

import pytest

from support import TESTSITE, LRPProcess
from twistedlrp.web.static import FoundFiles

DEV = {"LRP_TEST_DEBUG": "1", "LRP_TEST_NO_STATIC_ROOT": "1", "LRP_TEST_ADMIN": "1"}


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory):
    server = LRPProcess("--no-jobs", env=DEV, tmp=tmp_path_factory.mktemp("static-dev"))
    server.start()
    yield server
    server.kill()


def test_debug_without_static_root_serves_app_static_files(dev_server):
    import django.contrib.admin

    base = dev_server.get("/static/admin/css/base.css")
    assert base.status == 200
    assert base.headers["content-type"].startswith("text/css")
    admin_static = django.contrib.admin.__path__[0] + "/static/admin/css/base.css"
    assert base.body == open(admin_static, "rb").read()
    assert "last-modified" in base.headers
    again = dev_server.get(
        "/static/admin/css/base.css", headers={"If-Modified-Since": base.headers["last-modified"]}
    )
    assert again.status == 304
    # The test app's own static folder too.
    own = dev_server.get("/static/testapp/style.css")
    assert own.status == 200
    assert own.body == (TESTSITE / "testapp/static/testapp/style.css").read_bytes()
    assert "Static files: /static/ from the staticfiles finders" in dev_server.output()


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/admin/",
        "/static/admin/css/",
        "/static/nope.css",
        "/static/../testsite/settings.py",
        "/static/admin/..%2F..%2F..%2F__init__.py",
        "/static/admin/css/%2e%2e/%2e%2e/%2e%2e/__init__.py",
        "/static/%2Fetc%2Fpasswd",
        "/static/admin/css/base.css%00.txt",
    ],
)
def test_debug_static_files_refuse_traversal_and_directories(dev_server, path):
    response = dev_server.get(path)
    assert response.status in (400, 404), (path, response.status, response.body[:200])


def test_debug_static_files_refuse_writes(dev_server):
    assert dev_server.get("/static/admin/css/base.css", method="POST").status == 405


def test_without_debug_no_static_files_are_served(lrp_server):
    server = lrp_server("--no-jobs", env={**DEV, "LRP_TEST_DEBUG": ""})
    assert server.get("/static/admin/css/base.css").status == 404
    assert "staticfiles finders" not in server.output()


@pytest.mark.parametrize(
    "segments",
    [[b".."], [b"admin", b"..", b"admin"], [b"a/b"], [b"a\\b"], [b"\xff"], [b"x\x00"], [b""]],
)
def test_found_files_refuse_segments_that_could_leave_the_folders(segments):
    # Checked before the finders are asked (Django need not be set up).
    assert FoundFiles().path_of(segments) is None
