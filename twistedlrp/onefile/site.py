"""
A site given with ``--app``, in each process of the server (the server, its
web processes, its job workers, a reload child): where its settings come
from, and importing its file at the right moment.

    configure(options)   the server and web processes: the environment every
                         child reads (defaults.APP_VARIABLE, ...) and the
                         settings module to use
    before_settings()    before the settings module is imported: a file
                         that makes a nanodjango app is imported now (its
                         C{Django()} configures Django and sets it up)
    before_setup()       before C{django.setup()}: the file's module gets an
                         app config (label: its name) so models defined in it
                         have an app, as nanodjango does
    after_setup()        after C{django.setup()}: the file is imported, under
                         its module name (never C{__main__}), and the object
                         it names is checked (L{Site})

Each is a no-op without C{--app}. No Twisted here: the job workers use it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import traceback
import types
from dataclasses import dataclass

from twistedlrp.onefile import defaults
from twistedlrp.onefile.spec import DEFAULT_NAMES, AppSpec, SpecError, parse

VIEW, ROUTER, URLPATTERNS, WSGI = "view", "router", "urlpatterns", "wsgi"


@dataclass
class Site:
    """The object C{--app} names, and what it is."""

    spec: AppSpec
    module: types.ModuleType
    obj: object
    kind: str  # VIEW, ROUTER, URLPATTERNS or WSGI
    urlpatterns: list  # the root URL patterns it gives ([] for a WSGI application)
    nanodjango: bool = False

    @property
    def serves_django(self) -> bool:
        """Whether requests go through Django's handler (not a WSGI application's own)."""
        return self.kind != WSGI or self.nanodjango


_loaded: Site | None = None
# The --app value as typed, and its normalised form (the environment's): messages show the first.
_typed: tuple[str, str] | None = None
# True once this process sets a site given with --app up (a server, a
# worker): the file may be imported from then on (by us, or by Django's admin
# autodiscovery as django.setup() runs), and serve() called as it imports
# does nothing but add its object to served.
loading = False
served: list = []


def _error(message: str):
    from twistedlrp.boot import BootError

    return BootError(message)


def current_spec() -> AppSpec | None:
    """The site given with C{--app} in this process (from the environment), if any."""
    value = os.environ.get(defaults.APP_VARIABLE)
    if not value:
        return None
    try:
        spec = parse(value)
    except SpecError as e:
        raise _error(f"--app {e}") from None
    if _typed is not None and _typed[1] == value:
        spec = dataclasses.replace(spec, given=_typed[0])
    return spec


def loaded() -> Site | None:
    """The site imported by L{after_setup}, or C{None}."""
    return _loaded


def own_settings() -> bool:
    """Whether Django's settings are twistedlrp's defaults (C{--app} without C{--settings})."""
    return os.environ.get("DJANGO_SETTINGS_MODULE") == defaults.SETTINGS_MODULE


# -- the environment ------------------------------------------------------------------


def configure(options) -> str | None:
    """
    Set the environment that every process of this server reads for
    C{options["app"]}, and put the file's folder on C{sys.path}.

    @return: the settings module: the one given with C{--settings}, else
        L{defaults.SETTINGS_MODULE} with C{--app}, else C{options["settings"]}
        (C{$DJANGO_SETTINGS_MODULE}).
    """
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
        raise _error(f"--app {e}") from None
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
    """How to start this site again, for messages: C{python hello.py} or C{twistd lrp --app ...}."""
    spec = current_spec()
    given = spec.given if spec is not None else "FILE.py"
    return os.environ.get(defaults.COMMAND_VARIABLE) or f"twistd lrp --app {given}"


def given_settings() -> dict:
    """The settings given with C{--set} or C{serve()} keywords."""
    return json.loads(os.environ.get(defaults.SETTINGS_VARIABLE) or "{}")


# -- the three moments ----------------------------------------------------------------


def before_settings(settings_module: str) -> None:
    """
    Called before C{settings_module} is imported: with twistedlrp's
    settings, a file that makes a nanodjango app is imported first (its
    C{Django()} sets Django up, from L{defaults.nanodjango_settings}).
    """
    global loading
    spec = current_spec()
    if spec is None:
        return
    loading = True
    _put_on_path(spec)
    if settings_module == defaults.SETTINGS_MODULE and uses_nanodjango(spec):
        import_app(spec)


def before_setup() -> None:
    """
    Called before C{django.setup()}: with twistedlrp's settings, give the
    file's module an app config, so that models defined in the file belong
    to an app labelled by its name (as in nanodjango).
    """
    spec = current_spec()
    if spec is None or not own_settings() or spec.module in sys.modules:
        return
    from django.apps import AppConfig, apps

    if apps.ready or apps.loading:
        return
    placeholder = types.ModuleType(spec.module)
    placeholder.__file__ = spec.path or ""
    config_class = type(
        "SiteConfig",
        (AppConfig,),
        {"__module__": __name__, "path": spec.directory or os.getcwd()},
    )
    config = config_class(spec.module, placeholder)
    if config.label in apps.app_configs:
        return
    config.apps = apps
    apps.app_configs[config.label] = config


def after_setup() -> Site | None:
    """
    Called after C{django.setup()}: import the file (unless
    L{before_settings} did) and find the object it names.

    @return: the site, or C{None} without C{--app}.
    @raise twistedlrp.boot.BootError: the file does not import, has no such
        object, or the object is not one of the four kinds.
    """
    global _loaded
    spec = current_spec()
    if spec is None:
        return None
    if _loaded is not None and _loaded.spec.module == spec.module:
        return _loaded
    module = import_app(spec)
    _adopt_models(spec, module)
    obj, name = find_object(spec, module)
    _loaded = classify(spec.with_attr(name) if name else spec, module, obj)
    if _loaded.nanodjango:
        from twistedlrp import compat

        compat.prepare_nanodjango(obj)
    elif _loaded.kind != WSGI and not own_settings():
        # --settings too: its settings, but the URLs of what --app names.
        from django.conf import settings

        settings.ROOT_URLCONF = "twistedlrp.onefile.urls"
    return _loaded


def _adopt_models(spec: AppSpec, module: types.ModuleType) -> None:
    """
    The file is its app's models module (nanodjango's too): C{migrate
    --run-syncdb} creates the tables of an app's models only when it has one.
    """
    from django.apps import apps

    for config in apps.get_app_configs():
        if config.name == spec.module or config.module is module:
            config.module = module
            if config.models_module is None and config.models:
                config.models_module = module


# -- importing ------------------------------------------------------------------------


def uses_nanodjango(spec: AppSpec) -> bool:
    """Whether the file (or module) imports nanodjango: its C{Django()} configures Django."""
    import ast

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
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] == "nanodjango" for alias in node.names):
                return True
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] == "nanodjango":
                return True
    return False


def import_app(spec: AppSpec) -> types.ModuleType:
    """
    Import the file (by its path, under its module name) or the module.

    @raise twistedlrp.boot.BootError: with one line for a missing module, a
        setting the defaults do not give, or Django's configuration
        errors; with the traceback for any other error.
    """
    global loading
    existing = sys.modules.get(spec.module)
    if existing is None:
        _put_on_path(spec)
        loading = True
        try:
            existing = importlib.import_module(spec.module)
        except ModuleNotFoundError as e:
            if spec.path is None and e.name and spec.module.startswith(e.name):
                raise _error(
                    f"--app {spec.given}: no module named {e.name!r} (is its folder the "
                    f"working directory or given with --pythonpath?)"
                ) from None
            raise _import_error(spec, e) from None
        except Exception as e:
            raise _import_error(spec, e) from None
    if spec.path is not None:
        found = getattr(existing, "__file__", None)
        if not found or os.path.realpath(found) != os.path.realpath(spec.path):
            raise _error(
                f"--app {spec.given}: the module name {spec.module!r} is taken by "
                f"{found or 'a built-in module'}; rename the file"
            )
    return existing


def missing_setting(e: BaseException) -> str | None:
    """The name of the setting C{e} says Django's settings lack, if it is such an error."""
    name = getattr(e, "name", None)
    owner = type(getattr(e, "obj", None)).__name__
    holders = ("Settings", "LazySettings", "UserSettingsHolder")
    if isinstance(e, AttributeError) and name and name.isupper():
        if owner in holders or getattr(e.obj, "__name__", "") == "django.conf.global_settings":
            return name
    return None


def _import_error(spec: AppSpec, e: Exception):
    from django.core.exceptions import ImproperlyConfigured

    name = missing_setting(e)
    if name:
        return _error(
            f"{spec.label} needs the setting {name}, which the defaults do not give: "
            f"add --set {name}=VALUE (or serve(..., {name}=...))"
        )
    text = str(e).strip().splitlines()
    last = text[-1] if text else ""
    if isinstance(e, ImproperlyConfigured):
        return _error(f"{spec.label}: {last}")
    details = traceback.format_exc().rstrip()
    return _error(f"cannot import {spec.label}: {type(e).__name__}: {last}\n{details}")


def find_object(spec: AppSpec, module: types.ModuleType) -> tuple[object, str | None]:
    """
    @return: the object C{spec} names in C{module} (when it names none: the
        one the file gave C{serve()} as it imported, else the first of
        L{DEFAULT_NAMES} there), and its name (C{None} for the first).
    """
    if spec.attr:
        obj = module
        for part in spec.attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise _error(f"--app {spec.given}: {spec.label} has no {spec.attr!r}") from None
        return obj, spec.attr
    if served:
        return served[-1], None
    for name in DEFAULT_NAMES:
        if hasattr(module, name):
            return getattr(module, name), name
    names = ", ".join(DEFAULT_NAMES[:-1]) + " or " + DEFAULT_NAMES[-1]
    raise _error(
        f"--app {spec.given}: {spec.label} defines none of {names} and calls no serve() "
        f"as it imports; name the object: --app {spec.given}:NAME"
    )


# -- the four kinds -------------------------------------------------------------------


def classify(spec: AppSpec, module: types.ModuleType, obj) -> Site:
    """
    @raise twistedlrp.boot.BootError: C{obj} is none of a view, a
        L{twistedlrp.onefile.router.Router}, a list of URL patterns and a
        WSGI application.
    """
    from django.urls import URLPattern, URLResolver, re_path

    from twistedlrp.onefile.router import Router

    if isinstance(obj, Router):
        return Site(spec, module, obj, ROUTER, obj.urlpatterns)
    if isinstance(obj, list | tuple):
        wrong = [p for p in obj if not isinstance(p, URLPattern | URLResolver)]
        if not wrong:
            return Site(spec, module, obj, URLPATTERNS, list(obj))
        raise _error(
            f"--app {spec.given}: a list of URL patterns holds only path() and re_path() "
            f"entries, not {_describe(wrong[0])}"
        )
    if type(obj).__module__.split(".")[0] == "nanodjango" and hasattr(obj, "_prepare"):
        return Site(spec, module, obj, WSGI, [], nanodjango=True)
    view = obj.as_view() if isinstance(obj, type) and hasattr(obj, "as_view") else obj
    if callable(view) and not isinstance(view, type):
        arity = _positional(view)
        if arity == 1:
            name = spec.attr or getattr(view, "__name__", None)
            return Site(spec, module, obj, VIEW, [re_path(r"^", view, name=name)])
        if arity == 2:
            return Site(spec, module, obj, WSGI, [])
    raise _error(
        f"--app {spec.given}: expected a view (a callable taking a request), a Router, "
        f"a list of URL patterns or a WSGI application, got {_describe(obj)}"
    )


def _positional(function) -> int | None:
    """1 if C{function} can be called with one argument (a view), 2 if only with two (WSGI)."""
    import inspect

    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    for count in (1, 2):
        try:
            signature.bind(*range(count))
        except TypeError:
            continue
        return count
    return None


def _describe(obj) -> str:
    text = repr(obj)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(obj).__name__} {text}"


# -- tables ---------------------------------------------------------------------------


def migrates_at_start() -> bool:
    """Whether the server applies the migrations at its start: twistedlrp's settings, no DATABASES given."""
    return own_settings() and "DATABASES" not in given_settings()


def tables_missing() -> list[str]:
    """The models of the site's file whose tables the default database lacks."""
    site = loaded()
    if site is None:
        return []
    from django.apps import apps
    from django.db import connections, router

    config = next((c for c in apps.get_app_configs() if c.module is site.module), None)
    if config is None or not list(config.get_models()):
        return []
    missing = []
    for model in config.get_models():
        alias = router.db_for_write(model)
        with connections[alias].cursor():
            tables = connections[alias].introspection.table_names()
        if model._meta.db_table not in tables and model._meta.managed:
            missing.append(model.__name__)
    return missing
