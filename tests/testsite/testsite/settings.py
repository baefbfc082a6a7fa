"""Settings of the site the tests serve. Environment variables steer it."""

import os
import time
from pathlib import Path

# The tests count how often this module is imported.
if os.environ.get("LRP_TEST_IMPORT_LOG"):
    with open(os.environ["LRP_TEST_IMPORT_LOG"], "a") as f:
        f.write(f"{os.getpid()} {__name__} {time.time()}\n")

# LRP_TEST_SETTINGS_FAIL_IF: a path; importing the settings fails while it exists
# (a process started after the test creates it cannot set Django up).
if os.environ.get("LRP_TEST_SETTINGS_FAIL_IF") and os.path.exists(
    os.environ["LRP_TEST_SETTINGS_FAIL_IF"]
):
    raise RuntimeError("the test asked the settings to fail")

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "tests-only"
# LRP_TEST_DEBUG: DEBUG = True (Django's console handler, development static files).
DEBUG = bool(os.environ.get("LRP_TEST_DEBUG"))
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.staticfiles",
    "twistedlrp",
    "testapp",
]
MIDDLEWARE = []
# LRP_TEST_SECURITY_MIDDLEWARE: Django's SecurityMiddleware, with policies
# that are not Django's defaults (static answers must carry them too).
if os.environ.get("LRP_TEST_SECURITY_MIDDLEWARE"):
    MIDDLEWARE = ["django.middleware.security.SecurityMiddleware"]
    SECURE_REFERRER_POLICY = ["strict-origin", "no-referrer"]
    SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin-allow-popups"
ROOT_URLCONF = "testsite.urls"
# A job node needs no URLconf (the test of --jobs-only removes it).
if os.environ.get("LRP_TEST_NO_URLCONF"):
    del ROOT_URLCONF
WSGI_APPLICATION = "testsite.wsgi.application"
# The job progress widget's tests render pages with {% lrp_job_progress %}.
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

_TEST_DB = os.environ.get("LRP_TEST_DB", str(BASE_DIR / "test.sqlite3"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _TEST_DB,
        "CONN_MAX_AGE": 60,
        "OPTIONS": {"timeout": 20},
    }
}
# LRP_TEST_POSTGRES (a libpq connection string, e.g. "host=/tmp/pg port=5432
# user=postgres dbname=postgres") puts the same site on PostgreSQL: one
# database per LRP_TEST_DB path, named after its hash (tests/support.py
# creates it before a server starts).
if os.environ.get("LRP_TEST_POSTGRES"):
    import hashlib

    from psycopg.conninfo import conninfo_to_dict

    _pg = conninfo_to_dict(os.environ["LRP_TEST_POSTGRES"])
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "lrp_test_" + hashlib.sha1(_TEST_DB.encode()).hexdigest()[:20],
        "USER": _pg.pop("user", ""),
        "PASSWORD": _pg.pop("password", ""),
        "HOST": _pg.pop("host", ""),
        "PORT": _pg.pop("port", ""),
        "CONN_MAX_AGE": 60,
        "OPTIONS": {k: v for k, v in _pg.items() if k != "dbname"},
    }

STATIC_URL = "/static/"
STATIC_ROOT = os.environ.get("LRP_TEST_STATIC_ROOT") or str(BASE_DIR / "testapp" / "static")
# LRP_TEST_NO_STATIC_ROOT: no STATIC_ROOT (development static files from the finders).
if os.environ.get("LRP_TEST_NO_STATIC_ROOT"):
    STATIC_ROOT = None
# LRP_TEST_ADMIN: django.contrib.admin installed (its static files, as a fresh
# startproject site has them), without the rest of its set-up.
if os.environ.get("LRP_TEST_ADMIN"):
    INSTALLED_APPS.insert(0, "django.contrib.admin")
    SILENCED_SYSTEM_CHECKS = [f"admin.E{n}" for n in (402, 403, 404, 406, 408, 409, 410)]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LRP_JOB_MODULES = []
# The job service: a short cancel grace period keeps the tests quick.
LRP_JOBS_CANCEL_GRACE = float(os.environ.get("LRP_TEST_CANCEL_GRACE", "5"))
# django.tasks (Django 6) or the django-tasks backport: tasks run as jobs.
TASKS = {"default": {"BACKEND": "twistedlrp.tasks.LRPBackend"}}
# For the test of the error a job service without its app gives.
if os.environ.get("LRP_TEST_WITHOUT_JOBS_APP"):
    INSTALLED_APPS.remove("twistedlrp")
# Digits become a number; anything else stays text (the system check's test).
_streams = os.environ.get("LRP_TEST_PROGRESS_MAX_STREAMS", "200")
LRP_PROGRESS_MAX_STREAMS = int(_streams) if _streams.isdigit() else _streams
LRP_JOBS_TIMEOUT = float(os.environ.get("LRP_TEST_JOBS_TIMEOUT", "10"))
# Retention: a short keep for its tests (unset: the default, 7 days).
if os.environ.get("LRP_TEST_JOBS_KEEP"):
    LRP_JOBS_KEEP = os.environ["LRP_TEST_JOBS_KEEP"]
# The eager test mode, in a server (tests/test_jobs_eager.py).
if os.environ.get("LRP_TEST_JOBS_EAGER"):
    LRP_JOBS_EAGER = True
# Periodic jobs: LRP_SCHEDULE as JSON, for their tests (unset: no schedule).
if os.environ.get("LRP_TEST_SCHEDULE"):
    import json

    LRP_SCHEDULE = json.loads(os.environ["LRP_TEST_SCHEDULE"])
