"""
Template changes in development: reload the templates, not the server, as
C{manage.py runserver} does.

The server (L{twistedlrp.reload.server_main}) tells the supervisor which template
directories Django loads from (L{template_directories}, Django's own
C{get_template_directories()}), once Django is set up. The supervisor
watches them; when only files in them changed (no C{.py} file), it sends
the serving server a C{templates} message instead of restarting it, and the
server resets Django's template loaders (L{reset_loaders}, Django's own
C{reset_loaders()}, the cached loader included) in a thread, in its own
process and in each of its web processes (C{--web-workers}). The next
render reads the changed template from disk.

The module imports Django only inside its functions: the supervisor, which
never imports Django, uses L{describe_changes}.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from twisted.internet import defer, threads
from twisted.logger import Logger

log = Logger(namespace="twistedlrp.reload")


def template_directories() -> list[str]:
    """
    The directories the Django template engines load from: each
    C{TEMPLATES[...]["DIRS"]} entry and the C{templates} directory of each
    installed app (when C{APP_DIRS} or the app directories loader is used),
    Django's own excluded; resolved and sorted. Django must be set up.

    It is Django's C{django.template.autoreload.get_template_directories()},
    which C{runserver} watches.
    """
    from django.template.autoreload import get_template_directories

    return sorted({os.path.realpath(d) for d in get_template_directories()})


def reset_loaders() -> None:
    """
    Empty the template loaders' caches (Django's
    C{django.template.autoreload.reset_loaders()}: every Django template
    engine's loaders and the form renderer's), so that the next render
    reads the templates from disk again.

    It may build an engine or the form renderer the first time, which
    imports template tag libraries: call it from a thread, not the
    reactor's.
    """
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
    first = sorted(paths)[0]
    shown = os.path.relpath(first, cwd) if first.startswith(cwd.rstrip(os.sep) + os.sep) else first
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return f"{shown}{more}"
