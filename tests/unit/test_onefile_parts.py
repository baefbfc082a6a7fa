"""
A site in one file, without a server (twistedlrp.onefile): what --app names,
--set values, the arguments serve() execs the server with, and the Router
over Django's resolver. No settings are configured in this process.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from twisted.python import usage

from twistedlrp.onefile import defaults
from twistedlrp.onefile.runner import server_arguments
from twistedlrp.onefile.spec import AppSpec, SpecError, parse
from twistedlrp.options import Options


@pytest.fixture
def folder(tmp_path, monkeypatch):
    (tmp_path / "hello.py").write_text("def index(request): ...\n")
    (tmp_path / "my-site.py").write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_what_app_names(folder):
    hello = str(folder / "hello.py")
    assert parse("hello.py") == AppSpec("hello.py", "hello", hello, None)
    assert parse("hello.py:index") == AppSpec("hello.py:index", "hello", hello, "index")
    assert parse("./hello.py:site.app").attr == "site.app"
    assert parse(hello).as_value() == hello
    assert parse("hello.py:index").as_value() == f"{hello}:index"
    assert parse("hello:index") == AppSpec("hello:index", "hello", None, "index")
    assert parse("pkg.module:site") == AppSpec("pkg.module:site", "pkg.module", None, "site")


@pytest.mark.parametrize(
    "value, message",
    [
        ("nope.py", "nope.py: no such file: "),
        ("hello.py:", "is not a name of an object"),
        ("hello.py:1x", "is not a name of an object"),
        ("my-site.py", "the file's name must be a Python name"),
        ("pkg..mod:x", "expected FILE.py[:NAME] or MODULE[:NAME]"),
        ("", "got nothing"),
    ],
)
def test_what_app_refuses(folder, value, message):
    with pytest.raises(SpecError) as e:
        parse(value)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_option_checks_the_file_on_one_line(folder):
    with pytest.raises(usage.UsageError, match=r"^--app nope.py: no such file: .*nope.py$"):
        Options().parseOptions(["--app", "nope.py"])


@pytest.mark.parametrize(
    "text, value",
    [
        ("true", True),
        ("True", True),
        ("3", 3),
        ('["a", "b"]', ["a", "b"]),
        ("{'A': 1}", {"A": 1}),
        ("Europe/Paris", "Europe/Paris"),
        ("", ""),
    ],
)
def test_set_values(text, value):
    assert defaults.setting_values([f"NAME={text}"]) == {"NAME": value}


def test_set_needs_app_and_an_upper_case_name(folder):
    options = Options()
    options.parseOptions(["--app", "hello.py", "--set", "DEBUG=true", "--set", "X=a=b"])
    assert options["set"] == ["DEBUG=true", "X=a=b"]
    assert defaults.setting_values(options["set"]) == {"DEBUG": True, "X": "a=b"}
    with pytest.raises(usage.UsageError, match="upper-case setting name"):
        Options().parseOptions(["--app", "hello.py", "--set", "debug=true"])
    with pytest.raises(usage.UsageError, match="--set gives settings to a site given with --app"):
        Options().parseOptions(["--set", "DEBUG=true"])
    with pytest.raises(usage.UsageError, match="--set gives settings"):
        Options().parseOptions(["--app", "hello.py", "--settings", "x.settings", "--set", "A=1"])


def test_set_in_a_config_file(folder):
    (folder / "lrp.toml").write_text('app = "hello.py"\nset = { DEBUG = true, HOSTS = ["a"] }\n')
    options = Options()
    options.parseOptions(["--config", "lrp.toml"])
    assert defaults.setting_values(options["set"]) == {"DEBUG": True, "HOSTS": ["a"]}


def arguments(keywords: dict, argv=(), listen=None) -> list[str]:
    spec = parse("hello.py:app")
    return server_arguments(spec, listen, keywords, list(argv))


def test_serve_keywords_become_options_and_settings(folder):
    args = arguments({"workers": 4, "DEBUG": True, "MEDIA_ROOT": Path("/m")}, listen="tcp:9000")
    assert args[0] == f"--app={folder / 'hello.py'}:app"
    assert "--listen=tcp:9000" in args and "--workers=4" in args
    sets = dict(a.removeprefix("--set=").split("=", 1) for a in args if a.startswith("--set="))
    assert {k: json.loads(v) for k, v in sets.items()} == {"DEBUG": True, "MEDIA_ROOT": "/m"}


def test_the_command_line_wins_over_serve_keywords(folder):
    args = arguments(
        {"workers": 4, "DEBUG": True, "TIME_ZONE": "UTC"},
        argv=["--listen", "tcp:9001", "--workers", "1", "--set", "DEBUG=false", "--reload"],
        listen="tcp:9000",
    )
    assert [a for a in args if a.startswith("--listen")] == ["--listen=tcp:9001"]
    assert "--workers=1" in args and "--reload" in args
    sets = [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    assert defaults.setting_values(sets) == {"DEBUG": False, "TIME_ZONE": "UTC"}


def test_serve_keywords_win_over_a_config_file(folder):
    (folder / "lrp.toml").write_text("workers = 3\nthreads = 5\nset = { DEBUG = true, A = 1 }\n")
    args = arguments({"workers": 4, "DEBUG": False}, argv=["--config", "lrp.toml"])
    assert "--workers=4" in args and f"--config={folder / 'lrp.toml'}" in args
    assert not any(a.startswith("--threads") for a in args)  # the server reads the file again
    sets = [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    assert defaults.setting_values(sets) == {"DEBUG": False, "A": 1}


@pytest.mark.parametrize(
    "keywords, argv, message",
    [
        ({"thread": 4}, [], "serve(): unknown option 'thread'"),
        ({"OBJECT": object()}, [], "serve(): the setting OBJECT must be JSON"),
        ({}, ["--app", "hello.py"], "--app: the file that calls serve() is what it serves"),
        ({}, ["--threads", "x"], "--threads: expected a whole number"),
    ],
)
def test_serve_refuses_on_one_line(folder, keywords, argv, message):
    with pytest.raises(SystemExit) as e:
        arguments(keywords, argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_router_over_django_resolver():
    """Resolving only (reverse() needs settings: tests/test_onefile.py reverses by name)."""
    from django.http import Http404

    from twistedlrp.onefile.router import Router

    def index(request):
        return "index"

    def item(request, id):
        return ("item", id)

    api = Router(("items/<int:id>", item, "api-item"))
    router = Router(("/", index), ("hello/<int:id>", item), ("api/", api))

    @router.route("tag/<slug:tag>")
    def tag(request, tag):
        return ("tag", tag)

    def get(path):
        return router(types.SimpleNamespace(path_info=path))

    assert get("/") == "index"
    assert get("/hello/3") == ("item", 3)
    assert get("/api/items/7") == ("item", 7)
    assert get("/tag/a-b") == ("tag", "a-b")
    for missing in ("/hello/x", "/nope", "/api/items/"):
        with pytest.raises(Http404):
            get(missing)
    assert [getattr(p, "name", None) for p in router.urlpatterns] == ["index", "item", None, "tag"]
    with pytest.raises(TypeError, match="each route is"):
        Router(("only-a-pattern",))
