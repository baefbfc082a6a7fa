"""
child_arguments: what the reload supervisor passes to each server.
"""

from __future__ import annotations

from twistedlrp.options import TapOptions
from twistedlrp.reload.supervisor import child_arguments


class _Socket:
    def __init__(self, domain: str):
        self.domain = domain


def _parse(argv: list[str]) -> TapOptions:
    options = TapOptions()
    options.parseOptions(argv)
    return options


def test_command_line_options_sockets_and_passed_through_endpoints(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    config = tmp_path / "lrp.toml"
    config.write_text('graceful-timeout = 7\nlisten = ["tcp:9000"]\n')
    options = _parse(
        [
            "--reload",
            "--threads=4",
            "--proxy-headers",
            f"--pythonpath={a}",
            f"--pythonpath={b}",
            "--listen=tcp:8000",
            "--listen=unix:/run/x.sock",
            f"--config={config}",
        ]
    )
    # Both sockets bound by the supervisor, and an endpoint it could not bind.
    args = child_arguments(
        options, [_Socket("INET"), _Socket("UNIX")], ["ssl:8443:privateKey=key.pem"]
    )
    assert sorted(a for a in args if not a.startswith(("--listen", "--config"))) == [
        "--proxy-headers",
        f"--pythonpath={a}",
        f"--pythonpath={b}",
        "--threads=4",
    ]
    # The file is passed, not its values: each server re-reads it.
    assert f"--config={config}" in args
    assert not any("graceful-timeout" in a or "reload" in a for a in args)
    assert [a for a in args if a.startswith("--listen")] == [
        "--listen=systemd:domain=INET:index=0",
        "--listen=systemd:domain=UNIX:index=1",
        "--listen=ssl:8443:privateKey=key.pem",
    ]
    # A server parses them to the same values (its systemd: endpoints are
    # checked against the descriptors it inherits, which this test has not).
    child = _parse([a for a in args if not a.startswith("--listen")])
    assert child["threads"] == 4
    assert child["proxy-headers"] is True
    assert child["pythonpath"] == [str(a), str(b)]
    assert child["graceful-timeout"] == 7
    assert child["reload"] is False


def test_flags_that_are_off_and_defaults_are_not_passed():
    options = _parse(["--reload", "--listen=tcp:8000"])
    assert child_arguments(options, [_Socket("INET6")], []) == [
        "--listen=systemd:domain=INET6:index=0"
    ]
