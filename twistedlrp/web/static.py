"""
Static files, served by the reactor with C{twisted.web.static}: a directory
(C{--static}, C{STATIC_ROOT}), or in development what the staticfiles finders
find, as C{runserver} serves them.
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

    def serve(self, request, segments: list[bytes]):
        """Render the file named by the path C{segments} below this directory."""
        request.postpath = list(segments)
        return resource.getChildForRequest(self, request).render(request)


class FoundFiles:
    """The files the staticfiles finders find, asked at each request (a few C{stat} calls)."""

    def path_of(self, segments: list[bytes]) -> str | None:
        """
        @return: the file that the unquoted path C{segments} name, or C{None}: nothing
            found, or a segment that could leave the finders' folders (C{..}, say).
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
        return found if isinstance(found, str) and os.path.isfile(found) else None

    def serve(self, request, segments: list[bytes]):
        found = self.path_of(segments)
        if found is None:
            return resource.NoResource("No such file.").render(request)
        request.postpath = []
        return static.File(found).render(request)


def make_static(directory: str) -> StaticDirectory | FoundFiles:
    """@return: what serves the files below C{directory} (or the finders': L{FINDERS})."""
    return FoundFiles() if directory == FINDERS else StaticDirectory(directory)


def default_static_mapping() -> list[tuple[str, str]]:
    """
    Log which static files are served: @return: C{[(STATIC_URL, STATIC_ROOT)]}
        when STATIC_URL is a path on this site; C{[(STATIC_URL, FINDERS)]}
        with C{DEBUG} (or a site in one file) and the staticfiles app but no
        collected STATIC_ROOT; else nothing.
    """
    from django.apps import apps
    from django.conf import settings

    from twistedlrp.onefile import site

    root = getattr(settings, "STATIC_ROOT", None)
    url = str(getattr(settings, "STATIC_URL", None) or "")
    if not url or "://" in url or url.startswith("//"):
        return []
    url = url if url.startswith("/") else "/" + url
    if (
        (settings.DEBUG or site.own_settings())
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


def security_headers() -> list[tuple[bytes, bytes]]:
    """@return: the headers of every static answer (nosniff, and SecurityMiddleware's)."""
    headers = [(b"x-content-type-options", b"nosniff")]
    try:
        from django.conf import settings

        if "django.middleware.security.SecurityMiddleware" not in (settings.MIDDLEWARE or ()):
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
