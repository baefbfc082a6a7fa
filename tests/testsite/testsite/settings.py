"""Settings of the site the tests serve. Environment variables steer it."""

import os
import time
from pathlib import Path

# The tests count how often this module is imported.
if os.environ.get("LRP_TEST_IMPORT_LOG"):
    with open(os.environ["LRP_TEST_IMPORT_LOG"], "a") as f:
        f.write(f"{os.getpid()} {__name__} {time.time()}\n")

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.staticfiles",
    "twistedlrp",
    "testapp",
]
MIDDLEWARE = []
ROOT_URLCONF = "testsite.urls"
WSGI_APPLICATION = "testsite.wsgi.application"
TEMPLATES = []

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("LRP_TEST_DB", str(BASE_DIR / "test.sqlite3")),
        "CONN_MAX_AGE": 60,
        "OPTIONS": {"timeout": 20},
    }
}

STATIC_URL = "/static/"
STATIC_ROOT = os.environ.get("LRP_TEST_STATIC_ROOT") or str(BASE_DIR / "testapp" / "static")
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
LRP_JOBS_TIMEOUT = float(os.environ.get("LRP_TEST_JOBS_TIMEOUT", "10"))
