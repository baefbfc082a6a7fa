import pytest

from support import LRPProcess, pg_drop_created, postgres


@pytest.fixture
def lrp_server(tmp_path):
    """Factory: lrp_server(*args, env=...) starts a server, killed after the test."""
    started = []

    def start(*args, wait=True, **kwargs):
        kwargs.setdefault("tmp", tmp_path / f"server{len(started)}")
        kwargs["tmp"].mkdir(parents=True, exist_ok=True)
        server = LRPProcess(*args, **kwargs)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.kill()


def pytest_sessionfinish(session, exitstatus):
    if postgres():
        pg_drop_created()
