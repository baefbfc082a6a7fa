"""
The Celery app and the same no-op as a task, set up the way Django projects
do (settings from django.conf with the CELERY_ namespace; Celery's Django
fixup sets Django up in the worker). Deliberately not named tasks.py, which
twistedlrp would import as a job module.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")

app = Celery("jobsite")
app.config_from_object("django.conf:settings", namespace="CELERY")


@app.task
def noop(i):
    return i
