"""
A site given with ``--app``, in each process of the server (no Twisted here): its
settings (L{configure}) and its file, imported around ``django.setup()``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import os
import sys
import traceback
import types
from dataclasses import dataclass

from django.apps import AppConfig, apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from twistedlrp import compat
from twistedlrp.boot import BootError, not_found
from twistedlrp.onefile import defaults
from twistedlrp.onefile.spec import DEFAULT_NAMES, AppSpec, SpecError, parse


@dataclass
class Site:
    """The object C{--app} names: a view, Router or URL patterns, or a WSGI application."""

    spec: AppSpec
    module: types.ModuleType
    obj: object
    urlpatterns: list  # the root URL patterns it gives ([] for a WSGI application)
    wsgi: bool = False
    nanodjango: bool = False

    @property
    def serves_django(self) -> bool:
        return not self.wsgi or self.nanodjango


_loaded: Site | None = None
# The --app value as typed, and its normalised form (the environment's): messages show the first.
_typed: tuple[str, str] | None = None
# True once this process sets a site given with --app up: the file may be
# imported from then on (by Django's admin autodiscovery too), and serve()
# called as it imports only adds its object to served.
loading = False
served: list = []


def current_spec() -> AppSpec | None:
    """@return: the site given with C{--app}, from the environment, if any."""
    if not (value := os.environ.get(defaults.APP_VARIABLE)):
        return None
    try:
        spec = parse(value)
    except SpecError as e:
        raise BootError(f"--app {e}") from None
    if _typed is not None and _typed[1] == value:
        spec = dataclasses.replace(spec, given=_typed[0])
    return spec


def loaded() -> Site | None:
    return _loaded


def own_settings() -> bool:
    """Whether Django's settings are twistedlrp's defaults (C{--app} without C{--settings})."""
    return os.environ.get("DJANGO_SETTINGS_MODULE") == defaults.SETTINGS_MODULE


def configure(options) -> str | None:
    """Set the environment every process reads for C{--app}; @return: the settings module."""
    global _typed
    for variable in (
        defaults.APP_VARIABLE,
        defaults.SETTINGS_VARIABLE,
        defaults.STATE_DIR_VARIABLE,
    ):
        os.environ.pop(variable, None)
    if not options["app"]:
        os.environ.pop(defaults.COMMAND_VARIABLE, None)
        return options["settings"]
    try:
        spec = parse(options["app"])
    except SpecError as e:
        raise BootError(f"--app {e}") from None
    os.environ[defaults.APP_VARIABLE] = spec.as_value()
    _typed = (options["app"], spec.as_value())
    os.environ[defaults.STATE_DIR_VARIABLE] = os.path.abspath(options["state-dir"])
    _put_on_path(spec)
    if options.given.get("settings"):
        return options["settings"]
    os.environ[defaults.SETTINGS_VARIABLE] = json.dumps(defaults.setting_values(options["set"]))
    return defaults.SETTINGS_MODULE


def _put_on_path(spec: AppSpec) -> None:
    directory = spec.directory
    if directory and directory not in sys.path:
        sys.path.insert(0, directory)


def command() -> str:
    """@return: how to start this site again: C{python hello.py} or C{twistd lrp --app ...}."""
    spec = current_spec()
    given = spec.given if spec is not None else "FILE.py"
    return os.environ.get(defaults.COMMAND_VARIABLE) or f"twistd lrp --app {given}"


def before_settings(settings_module: str) -> None:
    """Before the settings: import a nanodjango file, whose C{Django()} sets Django up."""
    global loading
    spec = current_spec()
    if spec is None:
        return
    loading = True
    _put_on_path(spec)
    if settings_module == defaults.SETTINGS_MODULE and uses_nanodjango(spec):
        import_app(spec)


def before_setup() -> None:
    """Before C{django.setup()}: give the file an app config, so that its models have an app."""
    spec = current_spec()
    if spec is None or not own_settings() or spec.module in sys.modules:
        return
    if apps.ready or apps.loading:
        return
    placeholder = types.ModuleType(spec.module)
    placeholder.__file__ = spec.path or ""
    add_app_config(spec.module, placeholder, spec.directory or os.getcwd())


def add_app_config(name: str, module, path: str, label: str | None = None) -> None:
    """Give C{module} an app config (unless its label is taken), so that its models have an app."""
    attributes = {"__module__": __name__, "path": path, **({"label": label} if label else {})}
    config = type("SiteConfig", (AppConfig,), attributes)(name, module)
    config.apps = apps
    apps.app_configs.setdefault(config.label, config)


def after_setup() -> Site | None:
    """After C{django.setup()}: @return: the site imported, or C{None}; @raise BootError."""
    global _loaded
    spec = current_spec()
    if spec is None:
        return None
    if _loaded is not None and _loaded.spec.module == spec.module:
        return _loaded
    module = import_app(spec)
    # The file is its app's models module (migrate --run-syncdb needs one).
    for config in apps.get_app_configs():
        if config.name == spec.module or config.module is module:
            config.module = module
            if config.models_module is None and config.models:
                config.models_module = module
    obj, name = find_object(spec, module)
    _loaded = classify(dataclasses.replace(spec, attr=name) if name else spec, module, obj)
    if _loaded.nanodjango:
        compat.prepare_nanodjango(obj)
    elif not _loaded.wsgi and not own_settings():
        # --settings too: its settings, but the URLs of what --app names.
        settings.ROOT_URLCONF = "twistedlrp.onefile.urls"
    return _loaded


def uses_nanodjango(spec: AppSpec) -> bool:
    """@return: whether the file (or module) imports nanodjango."""
    path = spec.path
    if path is None:
        try:
            found = importlib.util.find_spec(spec.module)
        except (ImportError, ValueError):
            return False
        path = found.origin if found is not None else None
    if not path or not path.endswith(".py"):
        return False
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return False  # The import says what is wrong.
    nodes = list(ast.walk(tree))
    names = [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
    names += [n.module or "" for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0]
    return any(name.split(".")[0] == "nanodjango" for name in names)


def import_app(spec: AppSpec) -> types.ModuleType:
    """@return: the file (under its module name) or module, imported; @raise BootError."""
    global loading
    existing = sys.modules.get(spec.module)
    if existing is None:
        _put_on_path(spec)
        loading = True
        try:
            existing = importlib.import_module(spec.module)
        except Exception as e:
            missing = not_found(e, spec.module) if spec.path is None else None
            if missing:
                raise BootError(f"--app {spec.given}: {missing}") from None
            raise _importBootError(spec, e) from None
    if spec.path is not None:
        found = getattr(existing, "__file__", None)
        if not found or os.path.realpath(found) != os.path.realpath(spec.path):
            raise BootError(
                f"--app {spec.given}: the module name {spec.module!r} is taken by "
                f"{found or 'a built-in module'}; rename the file"
            )
    return existing


def missing_setting(e: BaseException) -> str | None:
    """@return: the name of the setting C{e} says Django's settings lack, if it says so."""
    name = getattr(e, "name", None)
    owner = type(getattr(e, "obj", None)).__name__
    holders = ("Settings", "LazySettings", "UserSettingsHolder")
    if isinstance(e, AttributeError) and name and name.isupper():
        if owner in holders or getattr(e.obj, "__name__", "") == "django.conf.global_settings":
            return name
    return None


def _importBootError(spec: AppSpec, e: Exception):
    name = missing_setting(e)
    if name:
        return BootError(
            f"{spec.label} needs the setting {name}, which the defaults do not give: "
            f"add --set {name}=VALUE (or serve(..., {name}=...))"
        )
    last = (str(e).strip().splitlines() or [""])[-1]
    if isinstance(e, ImproperlyConfigured):
        return BootError(f"{spec.label}: {last}")
    details = traceback.format_exc().rstrip()
    return BootError(f"cannot import {spec.label}: {type(e).__name__}: {last}\n{details}")


def find_object(spec: AppSpec, module: types.ModuleType) -> tuple[object, str | None]:
    """@return: the object C{spec} names (else C{serve()}'s, else a L{DEFAULT_NAMES}), its name."""
    if spec.attr:
        try:
            return functools.reduce(getattr, spec.attr.split("."), module), spec.attr
        except AttributeError:
            raise BootError(f"--app {spec.given}: {spec.label} has no {spec.attr!r}") from None
    if served:
        return served[-1], None
    for name in DEFAULT_NAMES:
        if hasattr(module, name):
            return getattr(module, name), name
    names = ", ".join(DEFAULT_NAMES[:-1]) + " or " + DEFAULT_NAMES[-1]
    raise BootError(
        f"--app {spec.given}: {spec.label} defines none of {names} and calls no serve() "
        f"as it imports; name the object: --app {spec.given}:NAME"
    )


def classify(spec: AppSpec, module: types.ModuleType, obj) -> Site:
    """@return: the L{Site} of C{obj}. @raise BootError: not a view, Router, URLs or WSGI app."""
    from django.urls import URLPattern, URLResolver, re_path

    from twistedlrp.onefile.router import Router

    if isinstance(obj, Router):
        return Site(spec, module, obj, obj.urlpatterns)
    if isinstance(obj, list | tuple):
        wrong = [p for p in obj if not isinstance(p, URLPattern | URLResolver)]
        if not wrong:
            return Site(spec, module, obj, list(obj))
        raise BootError(
            f"--app {spec.given}: a list of URL patterns holds only path() and re_path() "
            f"entries, not {_describe(wrong[0])}"
        )
    if type(obj).__module__.split(".")[0] == "nanodjango" and hasattr(obj, "_prepare"):
        return Site(spec, module, obj, [], wsgi=True, nanodjango=True)
    view = obj.as_view() if isinstance(obj, type) and hasattr(obj, "as_view") else obj
    if callable(view) and not isinstance(view, type):
        arity = _positional(view)
        if arity == 1:
            name = spec.attr or getattr(view, "__name__", None)
            return Site(spec, module, obj, [re_path(r"^", view, name=name)])
        if arity == 2:
            return Site(spec, module, obj, [], wsgi=True)
    raise BootError(
        f"--app {spec.given}: expected a view (a callable taking a request), a Router, "
        f"a list of URL patterns or a WSGI application, got {_describe(obj)}"
    )


def _positional(function) -> int | None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    for count in (1, 2):
        with contextlib.suppress(TypeError):
            signature.bind(*range(count))
            return count
    return None


def _describe(obj) -> str:
    text = repr(obj)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(obj).__name__} {text}"


def migrates_at_start() -> bool:
    """@return: whether the server migrates at its start (twistedlrp's settings, their database)."""
    return own_settings() and "DATABASES" not in json.loads(
        os.environ.get(defaults.SETTINGS_VARIABLE) or "{}"
    )


def tables_missing() -> list[str]:
    """@return: the names of the site's models whose tables the database lacks."""
    site = loaded()
    if site is None:
        return []
    from django.db import connections, router

    config = next((c for c in apps.get_app_configs() if c.module is site.module), None)
    return [
        model.__name__
        for model in (config.get_models() if config is not None else ())
        if model._meta.db_table
        not in connections[router.db_for_write(model)].introspection.table_names()
        and model._meta.managed
    ]
