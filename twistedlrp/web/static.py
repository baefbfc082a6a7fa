"""
Static files, served by the reactor (never by a pool thread), with
``Last-Modified``, ``If-Modified-Since`` and ranges from ``twisted.web.static``:
a directory (``--static``, ``STATIC_ROOT``), or in development (``DEBUG``
without a collected ``STATIC_ROOT``) the files the
``django.contrib.staticfiles`` finders find, as ``runserver`` serves them.
"""

from __future__ import annotations

import os

from twisted.logger import Logger
from twisted.web import resource, static

log = Logger()

# The "directory" of a mapping served through the staticfiles finders.
FINDERS = "<staticfiles finders>"


class StaticDirectory(static.File):
    """A directory of files with no directory listings, and no index files."""

    indexNames: list[str] = []

    def directoryListing(self):
        return resource.NoResource("No such file.")

    def createSimilarFile(self, path):
        similar = StaticDirectory(path, self.defaultType, self.ignoredExts, self.registry)
        similar.processors = self.processors
        return similar


class FoundFiles:
    """
    The files the C{django.contrib.staticfiles} finders find
    (C{STATICFILES_DIRS}, each app's C{static/} folder), as C{runserver}
    serves them in development. Each request asks the finders (a few
    C{stat} calls, in the reactor as L{StaticDirectory}'s are), so a new or
    changed file is served without a restart.
    """

    def path_of(self, segments: list[bytes]) -> str | None:
        """
        @return: the file that the URL path C{segments} (below C{STATIC_URL},
            unquoted) name, or C{None}: nothing found, or a segment that
            is empty, C{.}, C{..}, holds a slash, a backslash or NUL, or
            is not UTF-8 (so nothing outside the finders' folders is reached).
        """
        from django.contrib.staticfiles import finders
        from django.core.exceptions import SuspiciousFileOperation

        names = []
        for segment in segments:
            try:
                name = segment.decode("utf-8")
            except UnicodeDecodeError:
                return None
            if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
                return None
            names.append(name)
        try:
            found = finders.find("/".join(names))
        except (SuspiciousFileOperation, ValueError, OSError):
            return None
        if not isinstance(found, str) or not os.path.isfile(found):
            return None
        return found

    def render(self, request, segments: list[bytes]):
        found = self.path_of(segments)
        if found is None:
            return resource.NoResource("No such file.").render(request)
        request.postpath = []
        return static.File(found).render(request)


def make_static(directory: str) -> StaticDirectory | FoundFiles:
    """
    @return: a resource serving the files below C{directory}, or through
        the staticfiles finders if C{directory} is L{FINDERS}.
    """
    return FoundFiles() if directory == FINDERS else StaticDirectory(directory)


def default_static_mapping() -> list[tuple[str, str]]:
    """
    Say in the log which static files are served, and return them.

    @return: C{[(STATIC_URL, STATIC_ROOT)]} from the Django settings when
        STATIC_ROOT is set and STATIC_URL is a path on this site (not
        another host); with C{DEBUG} (or a site in one file on twistedlrp's
        settings, which has no C{manage.py collectstatic}) and
        C{django.contrib.staticfiles} installed, and no STATIC_ROOT or none
        collected yet (not a directory), C{[(STATIC_URL, FINDERS)]}; else an
        empty list.
    """
    from django.apps import apps
    from django.conf import settings

    from twistedlrp.onefile import site

    root = getattr(settings, "STATIC_ROOT", None)
    url = getattr(settings, "STATIC_URL", None)
    if not url:
        return []
    url = str(url)
    if "://" in url or url.startswith("//"):
        return []
    if not url.startswith("/"):
        url = "/" + url
    one_file = site.own_settings()
    if (
        (settings.DEBUG or one_file)
        and apps.is_installed("django.contrib.staticfiles")
        and not (root and os.path.isdir(root))
    ):
        log.info(
            "Static files: {url} from the staticfiles finders, as runserver serves them "
            "({why_here}, and STATIC_ROOT is {why})",
            url=url,
            why_here="DEBUG" if settings.DEBUG else "a site in one file",
            why="not collected" if root else "not set",
        )
        return [(url, FINDERS)]
    if not root:
        return []
    log.info("Static files: {url} from STATIC_ROOT {root}", url=url, root=str(root))
    return [(url, str(root))]


SECURITY_MIDDLEWARE = "django.middleware.security.SecurityMiddleware"


def security_headers() -> list[tuple[bytes, bytes]]:
    """
    @return: the headers every static answer carries: C{X-Content-Type-Options:
        nosniff}, and when the site runs Django's C{SecurityMiddleware}, the
        C{Referrer-Policy} and C{Cross-Origin-Opener-Policy} it would add
        to a page (from C{SECURE_REFERRER_POLICY} and
        C{SECURE_CROSS_ORIGIN_OPENER_POLICY}, if set).
    """
    headers = [(b"x-content-type-options", b"nosniff")]
    try:
        from django.conf import settings

        if SECURITY_MIDDLEWARE not in (getattr(settings, "MIDDLEWARE", None) or ()):
            return headers
        referrer = getattr(settings, "SECURE_REFERRER_POLICY", None)
        opener = getattr(settings, "SECURE_CROSS_ORIGIN_OPENER_POLICY", None)
    except Exception:  # Django is not set up (a test of the site alone).
        return headers
    if referrer:
        # As the middleware does: a comma-separated string or a list of fallbacks.
        values = [v.strip() for v in referrer.split(",")] if isinstance(referrer, str) else referrer
        headers.append((b"referrer-policy", ",".join(values).encode("latin-1")))
    if opener:
        headers.append((b"cross-origin-opener-policy", str(opener).encode("latin-1")))
    return headers


def serve(files: StaticDirectory | FoundFiles, request, remaining: list[bytes]):
    """Render the file named by the path segments C{remaining} below C{files}."""
    if isinstance(files, FoundFiles):
        return files.render(request, remaining)
    request.postpath = list(remaining)
    target = resource.getChildForRequest(files, request)
    return target.render(request)
