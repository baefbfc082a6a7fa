"""
The site of the job benchmark (bench/jobs.py): twistedlrp's job service and
Celery run the same no-op, from the same Django settings.

Environment: LRP_BENCH_DIR (a scratch directory: the SQLite file and the job
service's state directory) and LRP_BENCH_REDIS (the Redis server Celery uses).
"""

import os
import tempfile

BENCH_DIR = os.environ.get("LRP_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "lrp-bench-jobs")

SECRET_KEY = "bench-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "twistedlrp",
    "jobsite",
]
MIDDLEWARE = []
ROOT_URLCONF = "jobsite.urls"
WSGI_APPLICATION = "jobsite.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(BENCH_DIR, "jobs.sqlite3"),
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
LOGGING_CONFIG = None

# Clients (the benchmark process) reach the server's job service here;
# the server is started with --state-dir at the same place.
LRP_STATE_DIR = os.path.join(BENCH_DIR, "state")
LRP_JOBS_TIMEOUT = 60

# Celery, configured the usual Django way (namespace CELERY_): broker and
# results on one throwaway Redis, in two databases.
_REDIS = os.environ.get("LRP_BENCH_REDIS", "redis://127.0.0.1:6379")
CELERY_BROKER_URL = f"{_REDIS}/0"
CELERY_RESULT_BACKEND = f"{_REDIS}/1"
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
