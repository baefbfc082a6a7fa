"""django.tasks tasks of the test site (TASKS names twistedlrp.tasks.LRPBackend)."""

import os

try:
    from django.tasks import task
except ImportError:
    from django_tasks import task


class TaskRefused(Exception):
    """Raised by refuse() so that the tests can see the class path travel."""


@task
def add(a, b):
    return {"sum": a + b, "pid": os.getpid()}


@task(priority=7)
def pair(a, b):
    return (a, b)


@task
def refuse(reason):
    raise TaskRefused(reason)


@task
def divide(a, b):
    return a / b


@task
async def async_double(x):
    return 2 * x


@task(takes_context=True)
def attempt(context, tag):
    return {"attempt": context.attempt, "id": context.task_result.id, "tag": tag}


@task
def read_note_task(note_id):
    """The text of a note the enqueuing view wrote (DoesNotExist before its commit)."""
    from testapp.models import Note

    return Note.objects.get(id=note_id).text
