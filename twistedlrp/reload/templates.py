"""
Template changes reset Django's template loaders instead of restarting the
server, as C{runserver} does (Django imported inside: the supervisor has none).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from twisted.internet import defer, threads


def template_directories() -> list[str]:
    """@return: the directories Django's template engines load from, resolved and sorted."""
    from django.template.autoreload import get_template_directories

    return sorted({os.path.realpath(d) for d in get_template_directories()})


def reset_loaders() -> None:
    """Django's C{reset_loaders()}: it may import template tag libraries, so not in the reactor."""
    from django.template.autoreload import reset_loaders as django_reset_loaders

    django_reset_loaders()


def reset_in_thread(reactor) -> defer.Deferred:
    """L{reset_loaders} in the reactor's thread pool; fires when it is done."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), reset_loaders)


def describe_changes(paths: Sequence[str], cwd: str | None = None) -> str:
    """C{"app/templates/a.html"}, or C{"app/templates/a.html and 2 more"} (relative to C{cwd})."""
    if not paths:
        return "nothing"
    cwd = os.getcwd() if cwd is None else cwd
    first = min(paths)
    shown = os.path.relpath(first, cwd) if first.startswith(cwd.rstrip(os.sep) + os.sep) else first
    return shown + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
