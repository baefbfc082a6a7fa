"""
Static files, served by the reactor (never by a pool thread), with
``Last-Modified``, ``If-Modified-Since`` and ranges from ``twisted.web.static``.
"""

from __future__ import annotations

from twisted.web import resource, static


class StaticDirectory(static.File):
    """A directory of files with no directory listings."""

    def directoryListing(self):
        return resource.NoResource("No such file.")

    def createSimilarFile(self, path):
        similar = StaticDirectory(path, self.defaultType, self.ignoredExts, self.registry)
        similar.processors = self.processors
        similar.indexNames = []
        return similar


def make_static(directory: str) -> StaticDirectory:
    """@return: a resource serving the files below C{directory}."""
    files = StaticDirectory(directory)
    files.indexNames = []
    return files


def default_static_mapping() -> list[tuple[str, str]]:
    """
    @return: C{[(STATIC_URL, STATIC_ROOT)]} from the Django settings when
        STATIC_ROOT is set and STATIC_URL is a path on this site (not
        another host), else an empty list.
    """
    from django.conf import settings

    root = getattr(settings, "STATIC_ROOT", None)
    url = getattr(settings, "STATIC_URL", None)
    if not root or not url:
        return []
    url = str(url)
    if "://" in url or url.startswith("//"):
        return []
    if not url.startswith("/"):
        url = "/" + url
    return [(url, str(root))]


def serve(files: StaticDirectory, request, remaining: list[bytes]):
    """
    Render the file named by the path segments C{remaining} below C{files}.
    """
    request.postpath = list(remaining)
    target = resource.getChildForRequest(files, request)
    return target.render(request)
