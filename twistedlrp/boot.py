"""
Setting Django up before the reactor runs (docs/design.md, start-up steps 1 to 3);
a failure raises :class:`BootError`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback

from twistedlrp.stdlog import drop_django_console


def _log():
    # Imported on first use: Twisted would cost each job worker ~15 MiB.
    from twisted.logger import Logger

    return Logger(namespace=__name__)


class BootError(Exception):
    """Django could not be set up; the message says why."""


def prepare_path(pythonpath: list[str]) -> None:
    """Put the working directory and each C{--pythonpath} entry on sys.path."""
    for entry in reversed([os.getcwd(), *pythonpath]):
        entry = os.path.abspath(entry)
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def configure_settings(settings_module: str | None) -> None:
    """Set C{DJANGO_SETTINGS_MODULE} and import it; @raise BootError: none named, or no import."""
    if not settings_module:
        raise BootError(
            "no Django settings: pass --settings MODULE or set DJANGO_SETTINGS_MODULE "
            "(or serve a site in one file: --app hello.py)"
        )
    from twistedlrp.onefile import site

    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    # A nanodjango file is imported first: it configures Django itself.
    site.before_settings(settings_module)
    try:
        importlib.import_module(settings_module)
    except ImportError as e:
        problem = not_found(e, settings_module) or _last_line(e)
        raise BootError(f"cannot import settings module {settings_module!r}: {problem}") from None
    except Exception as e:
        raise BootError(
            f"settings module {settings_module!r} failed to import: {_last_line(e)}"
        ) from None


def setup_django(load_urlconf: bool = True) -> None:
    """C{django.setup()}, the checks, the URLconf; @raise BootError: set-up or a check failed."""
    from twistedlrp.onefile import site

    django_setup()
    drop_django_console()
    immediate = sqlite_immediate_transactions()
    if immediate:
        _log().info(
            "SQLite ({aliases}): transactions begin IMMEDIATE, as the job service writes "
            "concurrently (OPTIONS['transaction_mode'] in DATABASES chooses otherwise)",
            aliases=", ".join(immediate),
        )
    run_system_checks()
    if site.migrates_at_start():
        migrate_at_start()
    warn_unapplied_migrations()
    warn_missing_tables()
    if load_urlconf:
        load_root_urlconf()
    close_connections()


def django_setup() -> None:
    """C{django.setup()} with the C{--app} site imported around it; @raise BootError: it failed."""
    import django

    from twistedlrp.onefile import site

    with _failing("django.setup() failed"):
        try:
            site.before_setup()
            django.setup()
        except Exception as e:
            spec = site.current_spec()
            if spec is None or "labels aren't unique" not in str(e):
                raise
            raise BootError(
                f"--app {spec.given}: its module name {spec.module!r} is the label of an "
                f"installed app; rename the file"
            ) from None
    site.after_setup()


def migrate_at_start() -> None:
    """Apply the migrations of an C{--app} site; @raise BootError: a migration failed."""
    from django.core.management import call_command
    from django.db import DEFAULT_DB_ALIAS, connections

    plan, apps = _unapplied(DEFAULT_DB_ALIAS)
    if not plan:
        return
    with _failing("migrating the database failed"):
        call_command("migrate", interactive=False, verbosity=0)
    _log().info(
        "Applied {count} migration(s) of {apps} to {database}",
        count=len(plan),
        apps=apps,
        database=connections[DEFAULT_DB_ALIAS].settings_dict["NAME"],
    )


def warn_missing_tables() -> None:
    """Log a warning when models of the site's file (C{--app}) have no table."""
    from twistedlrp.onefile import site

    try:
        missing = site.tables_missing()
    except Exception as e:
        _log().warn("Could not check the tables of --app: {error}", error=_last_line(e))
        return
    if missing:
        _log().warn(
            "{file} defines models without tables ({models}): run '{command} --migrate' once",
            file=site.current_spec().label,
            models=", ".join(missing),
            command=site.command(),
        )


def migrate(options) -> None:
    """C{twistd lrp --migrate}: C{migrate --run-syncdb}; @raise BootError: it failed."""
    from twistedlrp.onefile import site

    prepare_path(options["pythonpath"])
    configure_settings(site.configure(options))
    django_setup()
    from django.core.management import call_command

    with _failing("migrate failed"):
        call_command("migrate", interactive=False, run_syncdb=True, verbosity=1)


def sqlite_immediate_transactions() -> list[str]:
    """Make SQLite transactions with no C{transaction_mode} C{IMMEDIATE}; @return: the aliases."""
    # A deferred transaction that read, then writes after another connection
    # committed, fails ("database is locked"); the job service writes concurrently.
    from django.db import connections

    changed = []
    for alias in connections:
        connection = connections[alias]
        options = connection.settings_dict.setdefault("OPTIONS", {})
        if connection.vendor == "sqlite" and "transaction_mode" not in options:
            options["transaction_mode"] = "IMMEDIATE"
            connection.close()  # the mode is read when a connection opens
            changed.append(alias)
    return changed


def run_system_checks() -> None:
    """Log the system checks' warnings; @raise BootError: with every error, one per line."""
    from django.core import checks

    with _failing("the system checks crashed"):
        messages = checks.run_checks(include_deployment_checks=False)
    messages = [m for m in messages if m.level >= checks.WARNING and not m.is_silenced()]
    errors = [m for m in messages if m.level >= checks.ERROR]
    for message in messages:
        if message.level < checks.ERROR:
            _log().warn("System check: {message}", message=str(message))
    if errors:
        lines = "\n".join(f"  {m}" for m in errors)
        count = len(errors)
        raise BootError(f"system check found {count} error{'s' if count > 1 else ''}:\n{lines}")


def warn_unapplied_migrations() -> None:
    """Log a warning for each database with unapplied migrations."""
    from django.conf import settings
    from django.db import DEFAULT_DB_ALIAS

    for alias in settings.DATABASES:
        try:
            plan, apps = _unapplied(alias)
        except Exception as e:
            _log().warn(
                "Could not check migrations of database {alias!r}: {error}",
                alias=alias,
                error=_last_line(e),
            )
            continue
        if plan:
            _log().warn(
                "Database {alias!r} has {count} unapplied migration(s) for app(s) {apps}; "
                "run 'python manage.py migrate{database}'.",
                alias=alias,
                count=len(plan),
                apps=apps,
                database="" if alias == DEFAULT_DB_ALIAS else f" --database {alias}",
            )


def _unapplied(alias: str) -> tuple[list, str]:
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections[alias])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return plan, ", ".join(sorted({migration.app_label for migration, _ in plan}))


def load_root_urlconf() -> None:
    """Import the URLconf and resolve once (no request races it); @raise BootError: it failed."""
    from django.urls import Resolver404, get_resolver

    with _failing("cannot load the URLconf"):
        resolver = get_resolver()
        resolver.url_patterns  # noqa: B018 - imports the URLconf module
        resolver.reverse_dict  # noqa: B018 - builds the lookups for reverse()
        with contextlib.suppress(Resolver404):
            resolver.resolve("/")


def load_wsgi_application():
    """@return: the WSGI app of C{--app} or C{WSGI_APPLICATION}; @raise BootError: no import."""
    from django.core.exceptions import ImproperlyConfigured
    from django.core.servers.basehttp import get_internal_wsgi_application

    from twistedlrp.onefile import site

    loaded = site.loaded()
    if loaded is not None and not loaded.serves_django:
        return loaded.obj
    with _failing("cannot load the WSGI application"):
        try:
            application = get_internal_wsgi_application()
        except ImproperlyConfigured as e:
            raise BootError(str(e)) from None
    # get_wsgi_application() ran django.setup() again, and so configured logging again.
    drop_django_console()
    return application


def import_app_modules(name: str, skip: tuple[str, ...] = ()) -> list[str]:
    """@return: the apps' C{name} modules (but C{skip}), imported; @raise BootError: one fails."""
    from django.apps import apps
    from django.utils.module_loading import module_has_submodule

    imported = []
    for config in apps.get_app_configs():
        if config.name in skip or not module_has_submodule(config.module, name):
            continue
        dotted = f"{config.name}.{name}"
        with _failing(f"cannot import {dotted}"):
            importlib.import_module(dotted)
        imported.append(dotted)
    return imported


def close_connections() -> None:
    from django.db import connections

    connections.close_all()


def not_found(error: BaseException, module: str) -> str | None:
    """@return: what to say if C{error} is that C{module} (or its package) is not found."""
    name = error.name if isinstance(error, ModuleNotFoundError) else None
    if not name or not module.startswith(name):
        return None
    return (
        f"no module named {name!r} "
        "(is its folder the working directory or given with --pythonpath?)"
    )


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _failing(what: str):
    """Turn an exception but L{BootError} into one: C{what}, its last line and traceback."""
    try:
        yield
    except BootError:
        raise
    except Exception as e:
        raise BootError(f"{what}: {_last_line(e)}\n{traceback.format_exc().rstrip()}") from None
