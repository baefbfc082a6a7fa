"""
``python hello.py``: a file that ends with ``serve(app)`` runs the server.

    from twistedlrp import serve      # at the top: see prepare_script()
    ...
    if __name__ == "__main__":
        serve(app, listen="tcp:8000", workers=4, DEBUG=True)

L{serve} does not serve the object it is given from this process, where the
file runs as ``__main__``: jobs defined there would be registered as
``__main__.name``, which no worker can import. It replaces the process
(``os.execv``, same pid, so Ctrl-C and a supervisor's signals reach the
server) with ``twistd -n lrp --app /abs/hello.py:app`` and the options:
the server imports the file under its module name, as uvicorn does with
``"module:app"``, and so do its workers. There, ``serve()`` only records
what it was given (so ``serve(Router(...))`` at module level needs no name)
and returns.

Keywords in lower case are ``twistd lrp`` options (``threads=4``,
``reload=True``); upper-case ones are Django settings, passed as ``--set``.
Options on the command line (``python hello.py --reload --workers 4``)
win over the keywords, which win over a ``--config`` file.
"""

from __future__ import annotations

import json
import os
import sys

from twistedlrp.onefile import defaults
from twistedlrp.onefile.spec import AppSpec

#: The module C{serve()} runs: C{twistd --nodaemon --pidfile= lrp ARGS}.
RUNNER = "twistedlrp.onefile"


def serve(app, listen: str | list[str] | None = None, **keywords) -> None:
    """
    Serve C{app} (a view, a L{twistedlrp.onefile.router.Router}, a list of
    URL patterns or a WSGI application, named at module level in the
    calling file) with C{twistd -n lrp}, in place of this process.

    @param listen: endpoint(s) to serve HTTP on [default: tcp:8000 on 127.0.0.1].
    @param keywords: C{twistd lrp} options by their long names with
        underscores (C{web_workers=2}), and Django settings (C{DEBUG=True}).
    @return: only when the server imports the file itself (it does nothing there).
    @raise SystemExit: a wrong option, on one line.
    """
    from twistedlrp.onefile import site

    if site.loading:
        # The server (or a worker) imports the file: it serves what was given.
        site.served.append(app)
        return None
    caller = sys._getframe(1).f_globals
    spec = _caller_spec(caller, app)
    argv = server_arguments(spec, listen, keywords, sys.argv[1:])
    # How the server's messages name this command ("run 'python hello.py --migrate'").
    os.environ[defaults.COMMAND_VARIABLE] = f"python {sys.argv[0]}"
    from twistedlrp.process.forkserver import flush_stdio

    flush_stdio()
    os.execv(sys.executable, [sys.executable, "-m", RUNNER, *argv])


def _caller_spec(caller: dict, app) -> AppSpec:
    """
    The C{--app} value naming C{app} in the module whose globals are
    C{caller}; with no name when the module does not name it (C{serve(Router(...))}
    at module level: importing the file calls C{serve()} again, which gives it).
    """
    name = next((key for key, value in caller.items() if value is app), None)
    path = caller.get("__file__")
    if not path:
        raise TypeError("serve(): call it from a file (python hello.py)")
    module = caller.get("__name__")
    loader_spec = caller.get("__spec__")
    if module == "__main__":
        # python -m pkg.module: import it under that name; python hello.py: by its path.
        module = loader_spec.name if loader_spec is not None else None
    if module and module != "__main__":
        return AppSpec(module, module, None, name)
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return AppSpec(path, stem, path, name)


def server_arguments(spec: AppSpec, listen, keywords: dict, argv: list[str]) -> list[str]:
    """
    The C{twistd lrp} arguments that serve C{spec}: the command line's
    options, then the keywords' for options it does not give.

    @raise SystemExit: an unknown option or a wrong value, on one line.
    """
    from twisted.python import usage

    from twistedlrp.config import COMMAND_LINE
    from twistedlrp.options import Options

    prog = os.path.basename(sys.argv[0] or "serve")
    options = _unchecked_options()
    options.synopsis = f"Usage: python {prog} [options]"
    try:
        options.parseOptions(list(argv))
        if options.given.get("app"):
            raise usage.UsageError(
                "--app: the file that calls serve() is what it serves; "
                "use twistd -n lrp --app to serve another"
            )
        on_command_line = {n for n, source in options.given.items() if source == COMMAND_LINE}
        settings = {}
        if listen is not None:
            keywords = {"listen": listen, **keywords}
        for key, value in keywords.items():
            if key.isupper():
                settings[key] = value
                continue
            name = key.replace("_", "-")
            if name not in Options.option_names or name in ("app", "set"):
                raise usage.UsageError(f"serve(): unknown option {key!r}")
            if name not in on_command_line:
                options.set_option(name, value)
        # The last value of a name wins: the file's, the keywords', the command line's.
        sets = [f"{key}={_json(key, value)}" for key, value in settings.items()]
        if "set" in on_command_line:
            sets = sets + options["set"]
        elif options.given.get("set"):
            sets = options["set"] + sets
        options.set_option("set", sets)
        options.set_option("app", spec.as_value())
        options.check()
    except usage.UsageError as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    return options.to_argv()


def _unchecked_options():
    from twistedlrp.config import apply_config_file
    from twistedlrp.options import Options

    class Unchecked(Options):
        """Options checked only once the keywords are in (C{--set} needs C{--app})."""

        def postOptions(self):
            if self["config"]:
                apply_config_file(self, self["config"])

    return Unchecked()


def _json(name: str, value) -> str:
    def plain(item):
        if isinstance(item, os.PathLike):
            return os.fspath(item)
        raise TypeError(f"{type(item).__name__} {item!r}")

    try:
        return json.dumps(value, default=plain)
    except (TypeError, ValueError) as e:
        from twisted.python import usage

        raise usage.UsageError(
            f"serve(): the setting {name} must be JSON (text, numbers, lists, dicts, "
            f"paths): every process of the server reads it from the environment; got {e}"
        ) from None


# -- the file's own run, before serve() -------------------------------------------------


def prepare_script() -> None:
    """
    When the C{__main__} file being run imports C{serve} (at its top), set
    Django up with the defaults (L{defaults.startproject}, the C{--set}
    values of the command line, an in-memory database), so that the rest of
    the file runs: model classes, C{django.contrib.auth} imports. That run
    only leads to L{serve}, which replaces the process with the server. A
    file that makes a nanodjango app, or has Django configured already, is
    left alone.
    """
    from twistedlrp.onefile import site
    from twistedlrp.onefile.site import uses_nanodjango

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if site.loading or not path or not path.endswith(".py") or not _imported_by(main):
        return
    from django.conf import settings

    if settings.configured:
        return
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = AppSpec(path, stem, path, None)
    if not stem.isidentifier() or uses_nanodjango(spec):
        return
    import django
    from django.apps import AppConfig, apps

    values = defaults.startproject(os.path.dirname(path), None, "not-served-from-here")
    values.update(_command_line_settings())
    try:
        settings.configure(**values)
        config_class = type(
            "ScriptConfig",
            (AppConfig,),
            {"__module__": __name__, "label": stem, "path": os.path.dirname(path)},
        )
        config = config_class("__main__", main)
        config.apps = apps
        apps.app_configs.setdefault(config.label, config)
        django.setup()
    except Exception:
        # The server sets the file up again and reports what is wrong.
        return
    _explain_missing_settings(os.path.basename(path))


def _explain_missing_settings(label: str) -> None:
    """
    A setting the file reads as it runs, which the defaults do not give,
    ends this run with one line instead of a traceback: only the command
    line's C{--set} reaches it (C{serve()}'s keywords come too late).
    """
    from twistedlrp.onefile.site import missing_setting

    previous = sys.excepthook

    def explain(kind, error, tb):
        name = missing_setting(error)
        if name is None:
            return previous(kind, error, tb)
        sys.stderr.write(
            f"{label}: error: {label} needs the setting {name}, which the defaults do not "
            f"give: add --set {name}=VALUE to the command line\n"
        )

    sys.excepthook = explain


def _imported_by(main) -> bool:
    """Whether the code importing us is the body of the C{__main__} module."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if frame.f_code.co_filename.startswith("<frozen importlib") or name.startswith(
            "twistedlrp"
        ):
            frame = frame.f_back
            continue
        return frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"
    return False


def _command_line_settings() -> dict:
    argv = sys.argv[1:]
    # --help and --version act when serve() parses the command line, not here.
    if not any(arg.startswith("--set") for arg in argv) or {"--help", "--version"} & set(argv):
        return {}
    options = _unchecked_options()
    try:
        options.parseOptions(argv)
    except (Exception, SystemExit):
        return {}
    return defaults.setting_values(options["set"])
