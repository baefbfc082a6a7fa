"""
A C{django.tasks} backend (Django 6, or the C{django-tasks} backport) that runs tasks
as jobs named C{task.module_path}; the result id is the job's id (docs/jobs.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import datetime

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

# The job registry imports each app's "tasks" module, this one even with no django.tasks.
try:
    from django.tasks import TaskResultStatus, signals
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import TaskContext, TaskError, TaskResult
    from django.tasks.exceptions import TaskResultDoesNotExist
except ImportError:
    try:
        from django_tasks import TaskResultStatus, signals
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.base import TaskContext, TaskError, TaskResult
        from django_tasks.exceptions import TaskResultDoesNotExist
    except ImportError:
        BaseTaskBackend = None

from twistedlrp.jobs import registry, states

__all__ = ["LRPBackend"]

# Job states → task statuses. A cancelled job is FAILED unless the installed
# django.tasks knows a status of its own for it.
_STATUS_NAMES = {
    states.QUEUED: "READY",
    states.RUNNING: "RUNNING",
    states.SUCCEEDED: "SUCCESSFUL",
    states.FAILED: "FAILED",
    states.CANCELLED: "CANCELLED",
}

# The exception class of a failure not the task's own (a timeout, a dead worker).
_SERVICE_ERROR = "twistedlrp.jobs.errors.JobError"
_CANCELLED_ERROR = "twistedlrp.jobs.errors.JobCancelled"


if BaseTaskBackend is None:

    class LRPBackend:
        """Stands in when neither C{django.tasks} nor C{django-tasks} is installed."""

        def __init__(self, alias, params):
            raise ImproperlyConfigured(
                "twistedlrp.tasks.LRPBackend needs django.tasks (Django 6.0+) or the "
                "django-tasks package (pip install django-tasks)"
            )

else:

    class LRPBackend(BaseTaskBackend):
        """Runs tasks as jobs; a call blocks its thread for at most the job client's timeout."""

        supports_defer = True
        supports_async_task = True
        supports_get_result = True
        supports_priority = True

        def validate_task(self, task) -> None:
            """Register C{task} as a job; @raise InvalidTask: (InvalidTaskError) it cannot run."""
            super().validate_task(task)
            name, queue, priority = task.module_path, task.queue_name, task.priority
            runner = _TaskRunner(name, task)
            registry.register(registry.JobDefinition(name, runner, priority=priority, queue=queue))

        def enqueue(self, task, args, kwargs):
            """
            Submit C{task} as a job; @return: its READY C{TaskResult}. @raise InvalidTask: (or
            InvalidTaskError) it cannot run. @raise twistedlrp.jobs.JobError: the service failed.
            """
            from twistedlrp.jobs.client import calls as client

            self.validate_task(task)
            info = client.call(
                "submit",
                name=task.module_path,
                args=list(args),
                kwargs=dict(kwargs),
                priority=int(task.priority),
                # A naive datetime (USE_TZ = False) is local time, as Django has it.
                run_after=task.run_after.timestamp() if task.run_after else None,
                key=None,
                timeout=None,
            )
            # The service does not send the arguments back on submit.
            info.setdefault("args", list(args))
            info.setdefault("kwargs", dict(kwargs))
            result = self._to_result(task, info)
            signals.task_enqueued.send(type(self), task_result=result)
            return result

        async def aenqueue(self, task, args, kwargs):
            return await sync_to_async(self.enqueue, thread_sensitive=False)(task, args, kwargs)

        def get_result(self, result_id):
            """
            @return: the C{TaskResult} of the job C{result_id}, as it is now. @raise
            TaskResultDoesNotExist: no such task. @raise JobServiceUnavailable: no service.
            """
            from twistedlrp.jobs import UnknownJob
            from twistedlrp.jobs.client import calls as client

            try:
                info = client.call("status", job_id=str(result_id))
            except UnknownJob:
                raise TaskResultDoesNotExist(result_id) from None
            # Its module_path names the function, not always the Task's name.
            definition = registry.lookup(info["name"])
            task = getattr(definition.function, "task", None) if definition else None
            if task is None:
                with contextlib.suppress(ImportError):
                    task = import_string(info["name"])
            if not hasattr(task, "module_path") or not hasattr(task, "func"):
                raise TaskResultDoesNotExist(
                    f"{result_id} is the job {info['name']!r}, not a django.tasks task"
                )
            return self._to_result(task, info)

        async def aget_result(self, result_id):
            return await sync_to_async(self.get_result, thread_sensitive=False)(result_id)

        def _to_result(self, task, info: dict):
            if task.priority != info.get("priority", task.priority):
                task = task.using(priority=info["priority"])
            started = _time(info.get("started_at"))
            # The job service records the worker of the last attempt only.
            worker = info.get("worker")
            worker_ids = [worker] * int(info.get("attempts") or 0) if worker else []
            values = {
                "task": task,
                "id": info["id"],
                "status": _status(info["state"]),
                "enqueued_at": _time(info.get("created_at")),
                "started_at": started,
                "finished_at": _time(info.get("finished_at")),
                "last_attempted_at": started,
                "args": list(info.get("args") or []),
                "kwargs": dict(info.get("kwargs") or {}),
                "backend": self.alias,
                "errors": _errors(info),
                "worker_ids": worker_ids,
            }
            # The dataclass differs between versions: None for a field unknown here.
            missing = dataclasses.MISSING
            fields = {
                f.name: values.get(f.name)
                for f in dataclasses.fields(TaskResult)
                if f.init
                and (f.name in values or (f.default is missing and f.default_factory is missing))
            }
            result = TaskResult(**fields)
            if info["state"] == states.SUCCEEDED:
                object.__setattr__(result, "_return_value", info.get("result"))
            return result


def _status(state: str):
    name = _STATUS_NAMES.get(state, "FAILED")
    return getattr(TaskResultStatus, name, None) or TaskResultStatus.FAILED


def _time(value):
    return datetime.fromisoformat(value) if value else None


def _errors(info: dict) -> list:
    text = info.get("error") or ""
    if info["state"] == states.CANCELLED:
        return [TaskError(exception_class_path=_CANCELLED_ERROR, traceback=text or "cancelled")]
    if not text or info["state"] == states.SUCCEEDED:
        return []
    return [TaskError(exception_class_path=exception_class_path(text), traceback=text)]


def exception_class_path(error: str) -> str:
    """
    @return: the exception class (C{"builtins.ValueError"}) in a job's error
        text, or L{_SERVICE_ERROR} for the job service's own errors.
    """
    lines = error.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = lines[frames[-1] + 1 :] if frames else []
    # The first line past the last frame's source line and carets (indented).
    last = next((line for line in after if not line.startswith("    ")), "")
    name = last.split(":", 1)[0].strip()
    if not name or " " in name:
        return _SERVICE_ERROR
    return name if "." in name else f"builtins.{name}"


class _TaskRunner:
    """The job function of a task: C{Task.call}, with a C{TaskContext} first if it takes one."""

    def __init__(self, name: str, task):
        self.name, self.task = name, task
        self.__name__ = self.__qualname__ = name
        self.__module__ = getattr(task.func, "__module__", __name__)

    def __call__(self, *args, **kwargs):
        if self.task.takes_context:
            args = (TaskContext(task_result=_current_result(self.task)), *args)
        return self.task.call(*args, **kwargs)


def _current_result(task):
    from twistedlrp.jobs.store import operations
    from twistedlrp.jobs.workers import context as _context

    job_id = _context.current_job_id()
    try:
        info = operations.get(job_id, full=False)
    except Exception:
        info = {"id": job_id, "attempts": 1, "worker": ""}
    info["state"] = states.RUNNING
    return task.get_backend()._to_result(task, info)
