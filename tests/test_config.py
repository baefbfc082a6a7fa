"""
``--config FILE``: a TOML file whose keys are the long option names. Options
on the command line win over the file; unknown keys and wrong types are
errors that name the key and the file. Also checks ``conf/lrp.toml``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from twisted.python import usage

from support import ROOT, TESTSITE, TWISTD, LRPProcess, free_port, wait_for
from twistedlrp.options import Options, TapOptions, options_from_kwargs


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def write(tmp_path, text: str, name: str = "lrp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_values_apply(tmp_path):
    config = write(
        tmp_path,
        """
        settings = "testsite.settings"
        listen = ["tcp:8123:interface=127.0.0.1", "tcp6:8124"]
        threads = 3
        graceful-timeout = 2.5
        proxy_headers = true
        forwarded-allow-ips = ["10.0.0.0/8", "127.0.0.1"]
        static = { "/assets/" = "." }
        workers = 0
        """,
    )
    options = parse("--config", str(config))
    assert options["settings"] == "testsite.settings"
    assert options["listen"] == ["tcp:8123:interface=127.0.0.1", "tcp6:8124"]
    assert options["threads"] == 3
    assert options["graceful-timeout"] == 2.5
    assert options["proxy-headers"] is True
    assert options["forwarded-allow-ips"] == ["10.0.0.0/8", "127.0.0.1"]
    assert options["static"] == [("/assets/", str(tmp_path.cwd()))]
    assert options["workers"] == 0


def test_command_line_wins(tmp_path):
    config = write(tmp_path, 'threads = 3\nlisten = ["tcp:8123"]\nhealth-path = "/up"\n')
    options = parse("--threads", "5", "--config", str(config), "--listen", "tcp:9000")
    assert options["threads"] == 5
    assert options["listen"] == ["tcp:9000"]
    assert options["health-path"] == "/up"
    # The order on the command line does not matter.
    assert parse("--config", str(config), "--threads=6")["threads"] == 6


def test_lrp_table_is_accepted(tmp_path):
    config = write(tmp_path, "[lrp]\nthreads = 4\n")
    assert parse("--config", str(config))["threads"] == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("thread = 3", "unknown option 'thread'"),
        ("help = true", "unknown option 'help'"),
        ("s = 'x.settings'", "unknown option 's'"),
        ("config = 'other.toml'", "unknown option 'config'"),
        ('threads = "16"', "threads: expected a whole number, got a string ('16')"),
        ("threads = 1.5", "threads: expected a whole number, got a number (1.5)"),
        ("threads = 0", "threads: must be at least 1, got 0"),
        ("graceful-timeout = true", "graceful-timeout: expected a number of seconds"),
        ("proxy-headers = 1", "proxy-headers: expected true or false, got an integer (1)"),
        ("listen = 8000", "listen: expected a list of strings, got an integer (8000)"),
        ("listen = ['nonsense:8000']", "listen: bad endpoint 'nonsense:8000'"),
        ("health-path = 5", "health-path: expected a string, got an integer (5)"),
    ],
)
def test_bad_keys_and_types_name_key_and_file(tmp_path, text, message):
    config = write(tmp_path, text + "\n")
    with pytest.raises(usage.UsageError) as raised:
        parse("--config", str(config))
    error = str(raised.value)
    assert error.startswith(f"{config}: "), error
    assert message in error, error


def test_unreadable_file(tmp_path):
    config = write(tmp_path, "threads = \n")
    with pytest.raises(usage.UsageError, match=r"--config: cannot read .*lrp.toml"):
        parse("--config", str(config))
    with pytest.raises(usage.UsageError, match="--config: no such file"):
        parse("--config", str(tmp_path / "missing.toml"))


def test_tap_options_exit_with_one_line(tmp_path):
    config = write(tmp_path, "thread = 3\n")
    with pytest.raises(SystemExit) as raised:
        TapOptions().parseOptions(["--config", str(config)])
    assert str(raised.value) == f"twistd lrp: error: {config}: unknown option 'thread'"


def test_make_service_options_use_the_same_checks(tmp_path):
    config = write(tmp_path, "threads = 3\nmax-waiting = 7\n")
    options = options_from_kwargs(threads=5, graceful_timeout=1, config=str(config))
    assert (options["threads"], options["max-waiting"], options["graceful-timeout"]) == (5, 7, 1)
    with pytest.raises(usage.UsageError, match="unknown option 'help'"):
        options_from_kwargs(help=True)


def test_example_config_documents_every_option():
    """conf/lrp.toml parses, and names every option (commented out or set)."""
    path = ROOT / "conf" / "lrp.toml"
    options = Options()
    text = path.read_text()
    for name in options.option_names:
        assert f"\n# {name} = " in text or f"\n{name} = " in text, name
    # What it sets is valid.
    parsed = parse("--config", str(path))
    assert parsed["settings"] == "mysite.settings"
    assert parsed["proxy-headers"] is True


def test_server_uses_the_file_and_the_command_line(tmp_path):
    port = free_port()
    config = write(
        tmp_path,
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\nthreads = 3\nhealth-path = "/-/up"\n',
    )
    server = LRPProcess("--config", str(config), "--threads", "5", listen=False, tmp=tmp_path)
    server.port = port
    try:
        server.start(wait=False)

        def up():
            assert server.proc.poll() is None, server.output()
            try:
                return server.get("/-/up", timeout=2)
            except OSError:
                return None

        health = wait_for(up, 30, message="the health endpoint of the file").json()
        assert health["threads"]["size"] == 5
    finally:
        server.kill()


@pytest.mark.parametrize(
    "text, message",
    [
        ("thread = 3\n", "unknown option 'thread'"),
        ('threads = "many"\n', "threads: expected a whole number, got a string ('many')"),
    ],
)
def test_server_refuses_a_bad_file(tmp_path, text, message):
    config = write(tmp_path, text)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "lrp", "--config", str(config)],
        cwd=TESTSITE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"twistd lrp: error: {config}: {message}"]


def _twistd_lrp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "lrp", *args],
        cwd=TESTSITE,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_server_refuses_an_option_prefix():
    result = _twistd_lrp("--thread", "4")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "twistd lrp: error: unknown option --thread (did you mean --threads?)"
    ]


def test_server_version():
    import django

    import twisted
    import twistedlrp

    result = _twistd_lrp("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"twistedlrp {twistedlrp.__version__} "), result.stdout
    assert f"Twisted {twisted.__version__}" in result.stdout
    assert f"Django {django.get_version()}" in result.stdout
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in result.stdout


def test_reload_from_the_file_and_a_file_change_restarts(tmp_path):
    port = free_port()
    config = write(
        tmp_path,
        f'reload = true\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
        # No job service (its store has no tables here: health would say "degraded").
        'health-path = "/-/one"\ngraceful-timeout = 3\nno-jobs = true\n',
    )
    server = LRPProcess("--config", str(config), listen=False, tmp=tmp_path)
    server.port = port
    try:
        server.start(wait=False)
        wait_for(lambda: _status(server, "/-/one") == 200, 30, message="the first server")
        assert "Reload supervisor" in server.output()
        config.write_text(config.read_text().replace("/-/one", "/-/two"))
        wait_for(lambda: _status(server, "/-/two") == 200, 10, message="the file's new value")
        # The server did not become a supervisor itself.
        assert server.output().count("Reload supervisor (pid") == 1
    finally:
        import os
        import signal

        if server.proc and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.proc.pid, signal.SIGKILL)
        server.kill()


def _status(server, path):
    try:
        return server.get(path, timeout=5).status
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
