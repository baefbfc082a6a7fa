"""
``python hello.py`` for a file that ends with ``serve(app, threads=4, DEBUG=True)``:
L{serve} execs ``twistd -n lrp --app /abs/hello.py:app`` (same pid, for the signals),
which imports the file under its module name (a worker cannot import C{__main__}).
"""

from __future__ import annotations

import json
import os
import sys

from twistedlrp.onefile import defaults, site
from twistedlrp.onefile.spec import AppSpec


def serve(app, listen: str | list[str] | None = None, **keywords) -> None:
    """
    Serve C{app} (a view, a Router, URL patterns or a WSGI application) with
    C{twistd -n lrp}, in place of this process. Lower-case keywords are options,
    upper-case ones settings; the command line wins over them, they over C{--config}.
    @return: only in the server, which imports the file. @raise SystemExit: a wrong option.
    """
    if site.loading:
        # The server (or a worker) imports the file: it serves what was given.
        site.served.append(app)
        return None
    spec = _caller_spec(sys._getframe(1).f_globals, app)
    argv = server_arguments(spec, listen, keywords, sys.argv[1:])
    # How the server's messages name this command ("run 'python hello.py --migrate'").
    os.environ[defaults.COMMAND_VARIABLE] = f"python {sys.argv[0]}"
    from twistedlrp.process.forkserver import flush_stdio

    flush_stdio()
    os.execv(sys.executable, [sys.executable, "-m", "twistedlrp.onefile", *argv])


def _caller_spec(caller: dict, app) -> AppSpec:
    """@return: the C{--app} value naming C{app} in the module whose globals are C{caller}."""
    name = next((key for key, value in caller.items() if value is app), None)
    path = caller.get("__file__")
    if not path:
        raise TypeError("serve(): call it from a file (python hello.py)")
    module = caller.get("__name__")
    if module == "__main__":
        # python -m pkg.module: import it under that name; python hello.py: by its path.
        module = getattr(caller.get("__spec__"), "name", None)
    if module and module != "__main__":
        return AppSpec(module, module, None, name)
    return AppSpec.of_file(path, name)


def server_arguments(spec: AppSpec, listen, keywords: dict, argv: list[str]) -> list[str]:
    """
    @return: the C{twistd lrp} arguments that serve C{spec}: the command line's,
        then the keywords' for options it does not give.
    @raise SystemExit: an unknown option or a wrong value, on one line.
    """
    from twisted.python import usage

    from twistedlrp.options import Options
    from twistedlrp.values import COMMAND_LINE

    prog = os.path.basename(sys.argv[0] or "serve")
    options = Options(checked=False)
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


def prepare_script() -> None:
    """
    The C{__main__} file imports C{serve}: set Django up (defaults, a database
    in memory) so that its models run up to L{serve} (unless nanodjango's).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if site.loading or not path or not path.endswith(".py") or not _imported_by(main):
        return
    from django.conf import settings

    if settings.configured:
        return
    spec = AppSpec.of_file(path)
    if not spec.module.isidentifier() or site.uses_nanodjango(spec):
        return
    import django

    values = defaults.startproject(spec.directory, None, "not-served-from-here")
    values.update(_command_line_settings())
    try:
        settings.configure(**values)
        site.add_app_config("__main__", main, spec.directory, label=spec.module)
        django.setup()
    except Exception:
        # The server sets the file up again and reports what is wrong.
        return
    # A setting the defaults lack that the file reads as it runs ends the run
    # with one line, not a traceback (serve()'s keywords come too late).
    previous, label = sys.excepthook, spec.label

    def explain(kind, error, tb):
        name = site.missing_setting(error)
        if name is None:
            return previous(kind, error, tb)
        sys.stderr.write(
            f"{label}: error: {label} needs the setting {name}, which the defaults do not "
            f"give: add --set {name}=VALUE to the command line\n"
        )

    sys.excepthook = explain


def _imported_by(main) -> bool:
    """@return: whether the code importing us is the body of the C{__main__} module."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not frame.f_code.co_filename.startswith("<frozen importlib"):
            if not name.startswith("twistedlrp"):
                return frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"
        frame = frame.f_back
    return False


def _command_line_settings() -> dict:
    argv = sys.argv[1:]
    # --help and --version act when serve() parses the command line, not here.
    if not any(arg.startswith("--set") for arg in argv) or {"--help", "--version"} & set(argv):
        return {}
    from twistedlrp.options import Options

    options = Options(checked=False)
    try:
        options.parseOptions(argv)
    except (Exception, SystemExit):
        return {}
    return defaults.setting_values(options["set"])
