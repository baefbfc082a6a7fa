# make run   venv + install + demo site migrated (+ its admin user, printed once) + twistd -n lrp on 127.0.0.1:8000
# make hello venv + install + example/hello.py, a site in one file, on 127.0.0.1:8000
# make test  venv + install + lint + the whole test suite
# make test-fast  the tests that start no process (tests/unit), in well under a minute
# make test-postgres LRP_TEST_POSTGRES="host=... user=... dbname=..."
#            the job and server tests with the test site on PostgreSQL
# make test-wagtail [LRP_TEST_POSTGRES=...]
#            a stock Wagtail site under twistd lrp, on SQLite (and on PostgreSQL if given)
# make test-topology
#            as root: docs/deploying.md's several machines in network namespaces (PostgreSQL,
#            two job nodes, two web nodes, nginx): a crash, a cut, a database restart, a rolling restart

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# A libpq connection string to a PostgreSQL server where this user may
# CREATE DATABASE; each test server gets a database of its own, dropped at the end.
LRP_TEST_POSTGRES ?= host=/var/run/postgresql user=postgres dbname=postgres
POSTGRES_TESTS ?= tests/test_jobs_core.py tests/test_jobs_process.py tests/test_jobs_pb.py \
	tests/test_tasks_backend.py tests/test_server_start.py tests/test_server_stop.py \
	tests/test_server_http.py tests/test_health.py tests/test_faults.py tests/test_jobs_nodes.py \
	tests/test_jobs_schedules.py tests/test_docs_several_machines.py tests/test_jobs_retention.py \
	tests/test_jobs_template.py tests/test_jobs_transactions.py tests/test_jobs_crash.py \
	tests/test_store_batch.py

.PHONY: install run hello test test-fast test-postgres test-wagtail lint format bench bench-jobs clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,reload,demo]'
	touch $(STAMP)

install: $(STAMP)

run: install
	cd example && ../$(PY) manage.py migrate --noinput -v0
	cd example && ../$(PY) manage.py demo_user
	cd example && ../$(PY) manage.py collectstatic --noinput -v0
	cd example && ../$(VENV)/bin/twistd -n --pidfile= lrp --settings mysite.settings

hello: install
	cd example && ../$(PY) hello.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The suite runs in TEST_PROCESSES processes (most of a test is waiting on
# real servers); the tests marked "alone" (timing-sensitive) run after, one
# at a time, on a machine the others no longer load. Exit status 5 is
# "no test selected" (a PYTEST_ARGS that names no such test).
TEST_PROCESSES ?= 4

test: install lint
	$(VENV)/bin/pytest -n $(TEST_PROCESSES) --dist loadscope -m "not alone" $(PYTEST_ARGS)
	$(VENV)/bin/pytest -m alone $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The tests that start no process (tests/unit), for the edit-test loop.
test-fast: install
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

$(VENV)/.installed-postgres: $(STAMP)
	$(PY) -m pip install -q -e '.[test,reload,demo,postgres]'
	touch $@

test-postgres: $(VENV)/.installed-postgres
	LRP_TEST_POSTGRES='$(LRP_TEST_POSTGRES)' $(VENV)/bin/pytest -n $(TEST_PROCESSES) --dist loadscope \
		-m "not alone" $(POSTGRES_TESTS) $(PYTEST_ARGS)
	LRP_TEST_POSTGRES='$(LRP_TEST_POSTGRES)' $(VENV)/bin/pytest -m alone $(POSTGRES_TESTS) $(PYTEST_ARGS) \
		|| [ $$? -eq 5 ]

# The PostgreSQL run only when LRP_TEST_POSTGRES is given (command line or
# environment), not with the default above.
WAGTAIL_POSTGRES := $(if $(filter file,$(origin LRP_TEST_POSTGRES)),,$(LRP_TEST_POSTGRES))

$(VENV)/.installed-wagtail: $(STAMP)
	$(PY) -m pip install -q -e '.[test,reload,demo,postgres,thirdparty]'
	touch $@

test-wagtail: $(VENV)/.installed-wagtail
	LRP_TEST_POSTGRES='$(WAGTAIL_POSTGRES)' $(VENV)/bin/pytest tests/test_wagtail.py $(PYTEST_ARGS)

# Needs wrk: installed with apt-get when missing and run as root on Debian.
# BENCH_ARGS="--rounds 3 --servers lrp-2,gunicorn-2" for a shorter run (bench/run.py --help).
BENCH_ARGS ?=

bench: install
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get install -y -q wrk >/dev/null; } \
		|| { echo "make bench needs wrk (Debian: apt-get install wrk)"; exit 2; }
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py $(BENCH_ARGS)

# Needs redis-server (Debian: apt-get install redis-server); Celery is skipped without it.
bench-jobs: install
	$(PY) -m pip install -q celery redis
	$(PY) bench/jobs.py

clean:
	rm -rf $(VENV) build *.egg-info example/staticfiles example/db.sqlite3 example/.lrp

# test-postgres runs the tests of the job store's PostgreSQL sessions and reads too.
POSTGRES_TESTS += tests/test_store_sessions.py tests/unit/test_store_sql.py

# Needs root, ip (iproute2), PostgreSQL (/usr/lib/postgresql/*/bin) and nginx; skips without them.
.PHONY: test-topology
test-topology: $(VENV)/.installed-postgres
	LRP_TEST_TOPOLOGY=1 $(VENV)/bin/pytest -s tests/test_topology.py $(PYTEST_ARGS)
