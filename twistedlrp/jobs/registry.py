"""
Which functions may run as jobs: those C{@job} (or C{django.tasks} C{@task}
with twistedlrp's backend) registered as their module was imported: the C{jobs}
and C{tasks} modules of the installed apps and C{settings.LRP_JOB_MODULES}
(L{discover}), and in a worker any other module the server registered a job from.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twistedlrp.backoff import Backoff
from twistedlrp.jobs.errors import NotRegistered


@dataclass
class JobDefinition:
    """A registered job function and its defaults."""

    name: str
    function: Callable[..., Any]
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 1.0
    priority: int = 0
    queue: str = "default"
    # Seconds a finished job is kept, "forever", or None: settings.LRP_JOBS_KEEP.
    keep: float | str | None = None

    @property
    def module(self) -> str | None:
        return getattr(self.function, "__module__", None)


def retry_delay(base: float, attempt: int) -> float:
    """@return: the delay after C{attempt} failed attempts: C{base}, doubling up to an hour, ±25 %."""
    return Backoff(max(base, 0.0), 3600.0, jitter=0.25).delay(attempt)


_registry: dict[str, JobDefinition] = {}


def register(definition: JobDefinition) -> None:
    """Register C{definition}; a later registration under the same name replaces it."""
    _registry[definition.name] = definition


lookup = _registry.get


def require(name: str) -> JobDefinition:
    """@return: the definition registered under C{name}; @raise NotRegistered: none is."""
    definition = _registry.get(name)
    if definition is None:
        known = names()
        raise NotRegistered(
            f"no job is registered under the name {name!r}; registered: "
            f"{', '.join(known[:20]) or 'none'} (jobs are functions decorated with "
            f"@twistedlrp.jobs.job in a 'jobs' or 'tasks' module of an installed app, "
            f"or in settings.LRP_JOB_MODULES)"
        )
    return definition


def find(name: str) -> JobDefinition:
    """L{require}, after importing the site's job modules if C{name} is not registered yet."""
    if name not in _registry:
        with contextlib.suppress(Exception):
            discover()
    return require(name)


def import_registered(module: str) -> str:
    """@return: C{""} once C{module} is imported, or why it could not be (only its jobs fail)."""
    try:
        importlib.import_module(module)
    except Exception as e:
        return f"cannot import {module}: {type(e).__name__}: {e}"
    return ""


def names() -> list[str]:
    return sorted(_registry)


def discover() -> list[str]:
    """@return: the dotted names of the site's job modules, imported. @raise BootError: one failed."""
    from django.conf import settings

    from twistedlrp import boot

    # Our own "tasks" module is the django.tasks backend, loaded through TASKS if
    # at all: importing it would cost every worker ~3.5 MiB (django.tasks or its backport).
    imported = boot.import_app_modules("jobs")
    imported += boot.import_app_modules("tasks", skip=("twistedlrp",))
    for dotted in getattr(settings, "LRP_JOB_MODULES", []) or []:
        try:
            importlib.import_module(dotted)
        except Exception as e:
            raise boot.BootError(f"cannot import {dotted} (LRP_JOB_MODULES): {e}") from None
        imported.append(dotted)
    return imported
