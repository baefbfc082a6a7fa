import os
import sys
from pathlib import Path

import pytest
from jobsupport import make_template_db

from support import LRPProcess, pg_drop_created, postgres

# The suite starts some 300 Python processes that import the same project
# modules (twistedlrp, the test site): without a bytecode cache each of them
# compiles those again, about 0.4 s of the 1.2 s of CPU a server takes to
# start, and pytest rewrites every test module again in each of its
# processes. So the cache is written even where PYTHONDONTWRITEBYTECODE is
# set (it is in some CI and sandbox environments); __pycache__ is ignored by git.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


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


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """The migrated test database (SQLite, or PostgreSQL with LRP_TEST_POSTGRES) that servers copy."""
    return make_template_db(tmp_path_factory.mktemp("template"))


def pytest_collection_modifyitems(config, items):
    # Every test outside tests/unit starts real processes: "slow", so that
    # -m "not slow" (make test-fast) runs only the in-memory ones.
    unit = Path(__file__).parent / "unit"
    for item in items:
        if unit not in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    if postgres():
        pg_drop_created()
