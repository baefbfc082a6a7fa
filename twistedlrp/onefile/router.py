"""
A router of ``path()`` patterns to views, each route named after its view
(or its third item) for ``reverse()``; a Router as a view includes it::

    app = Router(("", index), ("hello/<int:id>", hello), ("api/", api_router))
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import Http404
from django.urls import URLResolver, include, path
from django.urls.exceptions import Resolver404
from django.urls.resolvers import RegexPattern


class Router:
    """Routes C{(pattern, view)} or C{(pattern, view, name)} tuples."""

    def __init__(self, *routes: tuple):
        self.urlpatterns: list = []
        self._resolver: URLResolver | None = None
        for route in routes:
            if not isinstance(route, tuple | list) or len(route) not in (2, 3):
                raise TypeError(
                    f"Router: each route is (pattern, view) or (pattern, view, name), got {route!r}"
                )
            self.add(*route)

    def add(self, pattern: str, view, name: str | None = None) -> None:
        """Route C{pattern} (path syntax; a leading slash is dropped) to C{view}."""
        pattern = pattern.lstrip("/")
        self._resolver = None
        if isinstance(view, Router):
            self.urlpatterns.append(path(pattern, include(view.urlpatterns)))
            return
        if isinstance(view, type) and hasattr(view, "as_view"):
            view = view.as_view()
        if not callable(view):
            raise TypeError(f"Router: the view of {pattern!r} is not callable: {view!r}")
        self.urlpatterns.append(path(pattern, view, name=name or _name_of(view)))

    def route(self, pattern: str, name: str | None = None) -> Callable:
        """A decorator: C{@router.route("hello/<int:id>")}."""

        def register(view):
            self.add(pattern, view, name)
            return view

        return register

    def __call__(self, request, *args, **kwargs):
        if self._resolver is None:
            self._resolver = URLResolver(RegexPattern(r"^/"), self.urlpatterns)
        try:
            match = self._resolver.resolve(request.path_info)
        except Resolver404:
            raise Http404(f"no route of this router matches {request.path_info!r}") from None
        request.resolver_match = match
        return match.func(request, *match.args, **match.kwargs)

    def __repr__(self) -> str:
        return f"<Router {', '.join(str(p.pattern) or repr('') for p in self.urlpatterns)}>"


def _name_of(view) -> str | None:
    name = getattr(view, "__name__", None)
    return None if not name or name == "<lambda>" else name
