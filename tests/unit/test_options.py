"""
The option table of ``twistd lrp`` (twistedlrp.options, twistedlrp.values):
help, the command line and its refusals, TOML files, keyword options, and
to_argv(). Plain unit tests: no server is started.
"""

from __future__ import annotations

import pytest
from twisted.python import usage

import twistedlrp
from twistedlrp.options import (
    DEFAULT_LISTEN,
    OPTIONS,
    Options,
    TapOptions,
    options_from_kwargs,
)
from twistedlrp.values import COMMAND_LINE, CONFIG_FILE


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def values(options: Options) -> dict:
    return {option.name: options[option.name] for option in OPTIONS}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory with what the path options need; the working directory."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "static").mkdir()
    (tmp_path / "media").mkdir()
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "secret").chmod(0o600)  # a secret file others can read is refused
    monkeypatch.chdir(tmp_path)
    return tmp_path


RICH = [
    "--settings=mysite.settings",
    "--pythonpath=lib",
    "--pythonpath",
    "static",
    "-l",
    "tcp:0:interface=127.0.0.1",
    "--listen=unix:lrp.sock:mode=600",
    "--threads=4",
    "--graceful-timeout=2.5",
    "--static=/static/=static",
    "--static=/media/=media",
    "--access-log=-",
    "--max-body-size=0",
    "--max-waiting=7",
    "--proxy-headers",
    "--forwarded-allow-ips=10.0.0.0/8,::1",
    "--health-path=/up",
    "--state-dir=state",
    "--jobs-listen=tcp:0:interface=127.0.0.1",
    "--pb-listen=tcp:0",
    "--jobs-secret-file=secret",
    "--no-static",
    "--workers=0",
    "--max-jobs-per-worker=3",
    "--max-worker-memory=512",
    "--max-job-payload=2048",
    "--reload",
]


# -- to_argv ---------------------------------------------------------------


def test_round_trip_of_every_kind_of_option(site):
    options = parse(*RICH)
    argv = options.to_argv()
    again = parse(*argv)
    assert values(again) == values(options)
    assert again.to_argv() == argv
    # Flags, repeated options and lists are spelled out one by one.
    assert "--proxy-headers" in argv
    assert argv.count("--reload") == 1
    assert f"--static=/static/={site / 'static'}" in argv
    assert f"--static=/media/={site / 'media'}" in argv
    assert f"--pythonpath={site / 'lib'}" in argv
    assert "--forwarded-allow-ips=10.0.0.0/8,::1" in argv
    assert "--graceful-timeout=2.5" in argv


def test_only_given_options_and_flags_that_are_on(site):
    options = parse("--threads", "4", "--graceful-timeout", "30")
    assert options.to_argv() == ["--threads=4", "--graceful-timeout=30"]
    assert parse().to_argv() == []
    assert options_from_kwargs(proxy_headers=False, threads=2).to_argv() == ["--threads=2"]


def test_exclude_and_the_config_file(site):
    config = site / "lrp.toml"
    config.write_text('threads = 3\nhealth-path = "/up"\nlisten = ["tcp:0"]\n')
    options = parse("--config", str(config), "--workers=1", "--reload", "-l", "tcp:1234")
    assert options.given == {
        "config": COMMAND_LINE,
        "workers": COMMAND_LINE,
        "reload": COMMAND_LINE,
        "listen": COMMAND_LINE,
        "threads": CONFIG_FILE,
        "health-path": CONFIG_FILE,
    }
    # What the reload supervisor passes on: the command line, less what it replaces.
    assert options.to_argv(exclude={"reload", "listen", "config"}) == ["--workers=1"]
    assert options.to_argv() == [
        "--listen=tcp:1234",
        "--workers=1",
        "--reload",
        f"--config={config}",
    ]
    everything = options.to_argv(include_file=True, exclude={"config"})
    assert everything == [
        "--listen=tcp:1234",
        "--threads=3",
        "--health-path=/up",
        "--workers=1",
        "--reload",
    ]
    assert values(parse(*everything)) == values(options) | {"config": None}


def test_keyword_options_count_as_the_command_line(site):
    options = options_from_kwargs(
        threads=4, proxy_headers=True, pythonpath=["lib"], static={"/s/": "static"}
    )
    assert options.to_argv() == [
        f"--pythonpath={site / 'lib'}",
        "--threads=4",
        f"--static=/s/={site / 'static'}",
        "--proxy-headers",
    ]
    assert values(parse(*options.to_argv())) == values(options)


# -- defaults and --help ----------------------------------------------------


def test_defaults(monkeypatch):
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "env.settings")
    options = parse()
    assert options["settings"] == "env.settings"
    assert options["listen"] == [DEFAULT_LISTEN]
    assert (options["threads"], options["graceful-timeout"], options["workers"]) == (8, 30.0, 2)
    assert options["forwarded-allow-ips"] == ["127.0.0.1"]
    assert options["static"] == [] and options["pythonpath"] == []
    assert options["proxy-headers"] is False
    assert options.given == {}
    # A repeated option's first use replaces the default, later ones add to it.
    assert parse("-l", "tcp:1")["listen"] == ["tcp:1"]
    assert parse("-l", "tcp:1", "--listen=tcp:2")["listen"] == ["tcp:1", "tcp:2"]
    # Defaults are not shared between instances.
    options["static"].append(("/x/", "/x"))
    assert Options()["static"] == []


def test_help_lists_every_option_with_its_default():
    text = " ".join(Options().getUsage(width=1000).split())
    for option in OPTIONS:
        spelled = f"--{option.name}" if option.flag else f"--{option.name}="
        assert spelled in text, option.name
        assert option.help in text, option.name
    for shown in [
        "Threads that run the Django application [default: 8].",
        "together [default: 30].",
        "trusted [default: 127.0.0.1].",
        f"(repeatable) [default: {DEFAULT_LISTEN}].",
        "[default: $DJANGO_SETTINGS_MODULE]",
        "[default: STATIC_URL=STATIC_ROOT when both are local]",
        "[default: unix:<state-dir>/jobs.sock, mode 0600]",
        "Largest request body accepted, in bytes; larger ones get 413 unread [default: 10485760].",
        "Largest job arguments or result, in bytes [default: 1048576].",
        "-s, --settings=",
        "-l, --listen=",
        "--version",
    ]:
        assert shown in text, shown
    assert "[default: False]" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as raised:
        parse("--version")
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"twistedlrp {twistedlrp.__version__} (Twisted ")
    assert "Django " in out and "Python " in out


# -- refused command lines ---------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--thread", "4"], "unknown option --thread (did you mean --threads?)"),
        (["--threads=4", "--grace=3"], "unknown option --grace (did you mean --graceful-timeout?)"),
        (["--treads=4"], "unknown option --treads (did you mean --threads?)"),
        (["--bind", ":8000"], "unknown option --bind (did you mean --listen?)"),
        (["-b", "0.0.0.0:8000"], "unknown option -b (did you mean --listen?)"),
        (
            ["-w", "4"],
            "unknown option -w (did you mean --web-workers (web processes) or --threads "
            "(threads per process)? "
            "twistedlrp's --workers are job worker processes)",
        ),
        (["-threads", "4"], "unknown option -threads (did you mean --threads?)"),
        (["--reload", "-q"], "unknown option -q"),
        (["--frobnicate"], "unknown option --frobnicate"),
        (
            ["--no", "x"],
            "unknown option --no (did you mean one of --no-jobs, --no-metrics, --no-static, "
            "--no-worker-template or --node-name?)",
        ),
        (
            ["-sx.settings", "--health=/x"],
            "unknown option --health (did you mean one of --health-listen, --health-path or "
            "--health-requires-jobs?)",
        ),
    ],
)
def test_unknown_options_and_prefixes_are_refused(args, message):
    with pytest.raises(usage.UsageError) as raised:
        parse(*args)
    assert str(raised.value) == message
    with pytest.raises(SystemExit) as exited:
        TapOptions().parseOptions(args)
    assert str(exited.value) == f"twistd lrp: error: {message}"


def test_values_that_look_like_options_are_values():
    options = parse("--state-dir", "--thread", "-s", "a.b", "--access-log", "-")
    assert options["state-dir"] == "--thread"
    assert (options["settings"], options["access-log"]) == ("a.b", "-")
    # After "--" nothing is an option (and twistd lrp takes no arguments).
    with pytest.raises(usage.UsageError, match="Wrong number of arguments"):
        parse("--", "--thread")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads=0"], "--threads: must be at least 1, got 0"),
        (["--threads=x"], "--threads: expected a whole number, got 'x'"),
        (["--graceful-timeout=-1"], "--graceful-timeout: must not be negative, got '-1'"),
        (["--max-job-payload=100"], "--max-job-payload: must be at least 1024, got 100"),
        (["--settings=my-site"], "--settings: not a module path: 'my-site'"),
        (["--pythonpath=/no/such/dir"], "--pythonpath: no such directory: '/no/such/dir'"),
        (["--static=static"], "--static: expected PREFIX=DIR such as /static/=staticfiles"),
        (["--health-path=up"], "--health-path: must start with '/', got 'up'"),
        (["--forwarded-allow-ips=10.0.0.0/8,nope"], "not an address or network: 'nope'"),
        (["--listen=nonsense:80"], "--listen: bad endpoint 'nonsense:80'"),
        (["--listen=tcp:http"], "--listen: bad endpoint 'tcp:http'"),
        (["--listen=ssl:8443:privateKey=/no/key.pem"], "No such file or directory"),
        (["--listen=systemd:domain=INET:index=7"], "no such inherited socket"),
        (["--jobs-connect=nowhere"], "--jobs-connect: expected a client endpoint string"),
        (["--jobs-secret-file=/no/secret"], "--jobs-secret-file: no such file"),
        (["--no-jobs", "--jobs-only"], "--no-jobs and --jobs-only exclude each other"),
        (["--jobs-connect=unix:x", "--jobs-only"], "--jobs-connect and --jobs-only exclude"),
        (["--jobs-listen=tcp:0"], "--jobs-listen: a network listener (tcp:0) requires"),
        (["--config=/no/lrp.toml"], "--config: no such file"),
    ],
)
def test_bad_values(args, message):
    with pytest.raises(usage.UsageError) as raised:
        parse(*args)
    assert message in str(raised.value)


def test_endpoints_are_checked_without_listening(tmp_path):
    options = parse("-l", "tcp:0", "-l", "tcp6:0", "-l", f"unix:{tmp_path}/s.sock", "-l", "unix:x")
    assert len(options["listen"]) == 4
    assert not (tmp_path / "s.sock").exists()


def test_empty_secret_file(tmp_path):
    (tmp_path / "secret").write_text(" \n")
    (tmp_path / "secret").chmod(0o600)
    with pytest.raises(usage.UsageError, match="--jobs-secret-file: .* is empty"):
        parse("--jobs-secret-file", str(tmp_path / "secret"))


# -- TOML files and keywords -------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("thread = 3", "unknown option 'thread'"),
        ("version = true", "unknown option 'version'"),
        ('threads = "4"', "threads: expected a whole number, got a string ('4')"),
        ("threads = true", "threads: expected a whole number, got a boolean (True)"),
        ("workers = -1", "workers: must be at least 0, got -1"),
        (
            'graceful-timeout = "3"',
            "graceful-timeout: expected a number of seconds, got a string ('3')",
        ),
        ('reload = "yes"', "reload: expected true or false, got a string ('yes')"),
        ("pythonpath = [1]", "pythonpath: expected strings, got an integer (1)"),
        ("static = 5", "static: expected a list of strings, got an integer (5)"),
        (
            "forwarded-allow-ips = [1]",
            "forwarded-allow-ips: expected a string or a list of strings, got a list ([1])",
        ),
        ("settings = 3", "settings: expected a string, got an integer (3)"),
        ("[lrp]\nthreads = 2.5", "threads: expected a whole number, got a number (2.5)"),
    ],
)
def test_toml_errors_name_the_file_and_key(tmp_path, text, message):
    config = tmp_path / "lrp.toml"
    config.write_text(text + "\n")
    with pytest.raises(usage.UsageError) as raised:
        parse("--config", str(config))
    assert str(raised.value) == f"{config}: {message}"


def test_toml_values_and_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "static").mkdir()
    config = tmp_path / "lrp.toml"
    config.write_text(
        "[lrp]\nthreads = 3\nmax_waiting = 9\nlisten = 'tcp:1'\n"
        'static = [["/a/", "static"], "/b/=static"]\nforwarded-allow-ips = "*"\n'
    )
    options = parse("--config", str(config), "--threads=5")
    assert (options["threads"], options["max-waiting"]) == (5, 9)
    assert options["listen"] == ["tcp:1"]
    assert options["static"] == [
        ("/a/", str(tmp_path / "static")),
        ("/b/", str(tmp_path / "static")),
    ]
    assert options["forwarded-allow-ips"] == ["*"]
    assert options.given["threads"] == COMMAND_LINE
    assert options.given["max-waiting"] == CONFIG_FILE


def test_keyword_options():
    options = options_from_kwargs(graceful_timeout=5, max_body_size=0, listen="tcp:0")
    assert (options["graceful-timeout"], options["max-body-size"]) == (5.0, 0)
    assert options["listen"] == ["tcp:0"]
    for bad, message in [
        ({"thread": 4}, "unknown option 'thread'"),
        ({"graceful_timout": 4}, "unknown option 'graceful_timout'"),
        ({"version": True}, "unknown option 'version'"),
        ({"threads": "4"}, "--threads: expected a whole number, got a string ('4')"),
    ]:
        with pytest.raises(usage.UsageError) as raised:
            options_from_kwargs(**bad)
        assert str(raised.value) == message
    with pytest.raises(usage.UsageError, match="unknown option 'config'"):
        Options().set_option("config", "x.toml")


def test_several_job_nodes_on_the_command_line_in_a_file_and_in_the_environment(
    tmp_path, monkeypatch
):
    options = parse("--no-jobs", "--jobs-connect", "tcp:a:1", "--jobs-connect=unix:path=/b")
    assert options["jobs-connect"] == ["tcp:a:1", "unix:path=/b"]
    assert options.to_argv() == [
        "--jobs-connect=tcp:a:1",
        "--jobs-connect=unix:path=/b",
        "--no-jobs",
    ]
    assert parse()["jobs-connect"] == [] and parse()["job-threads"] is None
    config = tmp_path / "web.toml"
    config.write_text('no-jobs = true\njobs-connect = ["tcp:a:1", "tcp:b:2"]\njob-threads = 3\n')
    options = parse("--config", str(config))
    assert (options["jobs-connect"], options["job-threads"]) == (["tcp:a:1", "tcp:b:2"], 3)
    config.write_text('jobs-connect = "tcp:a:1"\n')
    assert parse("--config", str(config))["jobs-connect"] == ["tcp:a:1"]
    # LRP_JOBS_CONNECT: several separated by commas.
    import types

    from twistedlrp.jobs.client import calls as client

    monkeypatch.setattr("django.conf.settings", types.SimpleNamespace())
    monkeypatch.setenv("LRP_JOBS_CONNECT", "tcp:host=a:port=1, unix:path=/x\\,y")
    assert client.configured_endpoints() == ["tcp:host=a:port=1", "unix:path=/x\\,y"]
    monkeypatch.delenv("LRP_JOBS_CONNECT")
    monkeypatch.setenv("LRP_STATE_DIR", str(tmp_path))
    assert client.configured_endpoints() == [f"unix:path={tmp_path}/jobs.sock"]
    monkeypatch.setattr("django.conf.settings", types.SimpleNamespace(LRP_JOBS_CONNECT=["tcp:a:1"]))
    assert client.configured_endpoints() == ["tcp:a:1"]
