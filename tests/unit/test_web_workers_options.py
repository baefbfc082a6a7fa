"""--web-workers: its value, its checks against other options, and the hook scopes."""

from __future__ import annotations

import os

import pytest
from twisted.application import service
from twisted.python import usage

from twistedlrp import lifecycle, values
from twistedlrp.options import Options, options_from_kwargs


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_default_is_one_and_a_number_is_taken():
    assert parse()["web-workers"] == 1
    assert parse("--web-workers", "3")["web-workers"] == 3


def test_auto_is_the_number_of_cores(monkeypatch):
    assert values.cpu_count() >= 1
    monkeypatch.setattr(values, "cpu_count", lambda: 6)
    assert parse("--web-workers", "auto")["web-workers"] == 6
    assert options_from_kwargs(web_workers="auto")["web-workers"] == 6


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "--web-workers: must be at least 1, got 0"),
        ("two", "--web-workers: expected a whole number, got 'two'"),
    ],
)
def test_bad_values(value, message):
    with pytest.raises(usage.UsageError) as e:
        parse("--web-workers", value)
    assert str(e.value) == message


def test_config_file_takes_a_number_or_auto(tmp_path):
    config = tmp_path / "lrp.toml"
    config.write_text("web-workers = 4\n")
    assert parse("--config", str(config))["web-workers"] == 4
    config.write_text('web-workers = "auto"\n')
    assert parse("--config", str(config))["web-workers"] == values.cpu_count()
    config.write_text("web-workers = true\n")
    with pytest.raises(usage.UsageError, match="expected a whole number or 'auto'"):
        parse("--config", str(config))


def test_sockets_that_cannot_be_shared_are_refused():
    import twisted.test

    pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
    ssl = f"ssl:8443:privateKey={pem}"
    with pytest.raises(usage.UsageError, match="cannot be shared by several web processes"):
        parse("--web-workers", "2", "--listen", ssl)
    # One web process may listen on anything.
    assert parse("--listen", ssl)["web-workers"] == 1
    assert parse("--web-workers", "2", "--listen", "unix:/tmp/x.sock")["web-workers"] == 2


def test_jobs_only_has_no_web_processes():
    with pytest.raises(usage.UsageError, match="--web-workers and --jobs-only exclude each other"):
        parse("--web-workers", "2", "--jobs-only")


def test_to_argv_passes_it_on():
    assert "--web-workers=2" in parse("--web-workers", "2").to_argv()


def test_w_hints_at_web_workers():
    with pytest.raises(usage.UsageError, match=r"did you mean --web-workers \(web processes\)"):
        parse("-w", "4")


# -- hook and service scopes ----------------------------------------------------


@pytest.fixture
def clean_lifecycle():
    lifecycle._reset()
    yield
    lifecycle._reset()


def test_once_hooks_run_in_the_main_process_and_plain_ones_in_web_processes(clean_lifecycle):
    ran: list[str] = []

    @lifecycle.on_startup
    def plain():
        ran.append("plain")

    @lifecycle.on_startup(once=True)
    def once():
        ran.append("once")

    shut = lifecycle.on_shutdown(once=True)(lambda: ran.append("once-shutdown"))
    assert callable(shut)
    for scope, expected in (("all", ["plain", "once"]), ("once", ["once"]), ("each", ["plain"])):
        ran.clear()
        lifecycle.StartupHooks(scope).startService()
        assert ran == expected, scope
    assert [h.__name__ for h in lifecycle.hooks_in_scope(lifecycle._shutdown_hooks, "each")] == []
    assert len(lifecycle.hooks_in_scope(lifecycle._shutdown_hooks, "once")) == 1


def test_services_of_the_other_scope_are_registered_but_not_started(clean_lifecycle):
    plain, once = service.Service(), service.Service()
    lifecycle.add_service("plain", plain)
    lifecycle.add_service("once", once, once=True)
    assert lifecycle.get_service("once") is once
    services = lifecycle.SiteServices("each")
    services.startService()
    assert plain.running and not once.running
    services.stopService()
    assert not plain.running
