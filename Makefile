# make run   venv + install + demo site migrated + twistd -n lrp on 127.0.0.1:8000
# make test  venv + install + lint + the whole test suite

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test lint format bench clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,reload]'
	touch $(STAMP)

install: $(STAMP)

run: install
	cd example && ../$(PY) manage.py migrate --noinput -v0
	cd example && ../$(PY) manage.py collectstatic --noinput -v0
	cd example && ../$(VENV)/bin/twistd -n --pidfile= lrp --settings mysite.settings

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m pip install -q gunicorn granian
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info example/staticfiles example/db.sqlite3 example/.lrp
