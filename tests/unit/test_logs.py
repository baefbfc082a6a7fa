"""
twistedlrp.logs without a server: the option values, JSON lines, the level
filter, the file twistd would log to, and the stdlib bridge.
"""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from twistedlrp import logs


def test_option_values_are_checked():
    assert logs.log_level("log-level", "DEBUG") == "debug"
    assert logs.log_level("log-level", "warning") == "warn"
    assert logs.log_format("log-format", " json ") == "json"
    assert logs.access_log_format("access-log-format", "combined+duration") == "combined+duration"
    with pytest.raises(usage.UsageError, match=r"^--log-level: expected one of debug, info, "):
        logs.log_level("log-level", "verbose")
    with pytest.raises(usage.UsageError, match=r"^--log-format: expected text or json, got 'x'"):
        logs.log_format("log-format", "x")


def emit(observer, level=LogLevel.info, namespace="test.ns", failure=None, **fields):
    publisher = LogPublisher(observer)
    log = Logger(namespace=namespace, observer=publisher)
    if failure is not None:
        log.failure("it broke: {what}", failure, what="x", **fields)
    else:
        log.emit(level, "job {name} took {duration:.3f} s", **fields)


def test_json_line_has_the_fixed_fields_then_the_events():
    out = io.StringIO()
    observer = logs.make_observer(out, "json", "info")
    emit(observer, name="add", duration=0.0123, job_id="j1", odd={1, 2})
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert list(record)[:5] == ["time", "level", "namespace", "message", "pid"]
    assert record["level"] == "info" and record["namespace"] == "test.ns"
    assert record["message"] == "job add took 0.012 s"
    assert record["name"] == "add" and record["duration"] == 0.0123 and record["job_id"] == "j1"
    assert record["odd"] in ("{1, 2}", "{2, 1}")  # not JSON: as text
    assert record["time"].endswith("Z") and "T" in record["time"]


def test_json_line_of_a_failure_carries_its_traceback_and_no_duplicate_field():
    out = io.StringIO()
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    emit(logs.make_observer(out, "json"), failure=failure)
    record = json.loads(out.getvalue())
    assert record["level"] == "critical" and record["message"] == "it broke: x"
    assert "ZeroDivisionError" in record["traceback"]
    out = io.StringIO()
    publisher = LogPublisher(logs.make_observer(out, "json"))
    Logger(namespace="a", observer=publisher).info("{line}", line="GET / 200")
    assert "line" not in json.loads(out.getvalue())


def test_the_level_filters_events_and_enabled_says_so():
    out = io.StringIO()
    observer = logs.make_observer(out, "text", "warn")
    emit(observer, level=LogLevel.info, name="a", duration=1)
    emit(observer, level=LogLevel.warn, name="b", duration=1)
    assert "job a" not in out.getvalue() and "[test.ns#warn] job b took 1.000 s" in out.getvalue()
    try:
        logs.set_level("warn")
        assert not logs.enabled(LogLevel.info) and logs.enabled(LogLevel.error)
        logs.set_level("debug")
        assert logs.enabled(LogLevel.debug)
    finally:
        logs.set_level("info")


def test_twistd_log_file_follows_twistds_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert logs.twistd_log_file({"nodaemon": True, "logfile": None}) is sys.stdout
    assert logs.twistd_log_file({"nodaemon": True, "logfile": "-"}) is sys.stdout
    assert logs.twistd_log_file({"nodaemon": False, "logfile": "-"}) is None  # twistd refuses
    assert logs.twistd_log_file({"nodaemon": True, "syslog": True}) is None
    import signal

    monkeypatch.setattr(signal, "getsignal", lambda n: signal.SIG_IGN)  # keep ours as it is
    log_file = logs.twistd_log_file({"nodaemon": False, "logfile": None})
    try:
        assert log_file.path == str(tmp_path / "twistd.log")
    finally:
        log_file.close()


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield root
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


def test_the_bridge_is_added_once_and_follows_the_level(root_logger):
    logs.bridge_stdlib_logging("warn")
    logs.bridge_stdlib_logging("info")
    bridges = [h for h in root_logger.handlers if getattr(h, "_twistedlrp", False)]
    assert len(bridges) == 1 and bridges[0].level == logging.INFO
    assert root_logger.level <= logging.INFO


def test_djangos_console_handler_is_dropped_only_where_it_would_repeat(root_logger):
    from django.utils.log import RequireDebugTrue

    logs.bridge_stdlib_logging("info")
    console = logging.StreamHandler()
    console.name = "console"
    console.addFilter(RequireDebugTrue())
    mine = logging.StreamHandler()  # the site's own: kept
    mine.name = "mine"
    propagating = logging.getLogger("lrp.test.propagating")
    isolated = logging.getLogger("lrp.test.isolated")
    isolated.propagate = False
    try:
        for logger in (propagating, isolated):
            logger.addHandler(console)
            logger.addHandler(mine)
        assert logs.drop_django_console() == 1
        assert propagating.handlers == [mine]
        assert isolated.handlers == [console, mine]  # its records never reach the bridge
    finally:
        propagating.handlers.clear()
        isolated.handlers.clear()


def test_a_workers_record_lines_are_read_back():
    from twistedlrp.stdlog import parse_record

    assert parse_record("WARNING myapp.jobs: no rows: none") == (
        "warn",
        "myapp.jobs",
        "no rows: none",
    )
    assert parse_record("CRITICAL x: y") == ("critical", "x", "y")
    assert parse_record("DEBUG a-b.c: ") == ("debug", "a-b.c", "")
    assert parse_record("Traceback (most recent call last):") is None
    assert parse_record("warning myapp: lower case is a print") is None
    assert parse_record("WARNING two words: x") is None


def test_a_worker_writes_its_records_at_the_servers_level(root_logger, monkeypatch, capsys):
    from twistedlrp import stdlog

    root_logger.handlers.clear()
    monkeypatch.setenv(stdlog.LEVEL_VARIABLE, "info")
    stdlog.install_worker_handler()
    logging.getLogger("myapp.jobs").info("hello %s", "there")
    logging.getLogger("myapp.jobs").debug("not this")
    assert capsys.readouterr().err == "INFO myapp.jobs: hello there\n"
    # The site's LOGGING gave the root logger handlers: they stay alone.
    root_logger.handlers[:] = [logging.NullHandler()]
    stdlog.install_worker_handler()
    assert len(root_logger.handlers) == 1
