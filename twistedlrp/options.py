"""
The options of ``twistd lrp``, for the command line, ``--config`` files and
:func:`twistedlrp.make_service`: one row of :data:`OPTIONS` each. A wrong
value raises :class:`usage.UsageError` with a one-line message naming it.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from twisted.python import usage

from twistedlrp import logs, values
from twistedlrp.values import (
    COMMAND_LINE,
    CONFIG_FILE,
    STRING,
    STRINGS,
    Kind,
    apply_config_file,
    python_value,
    setting_values,
    static_values,
)

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Option:
    """One option of C{twistd lrp}: a row of L{OPTIONS}."""

    name: str  # the long name, also the key of its value
    default: Any  # a value, or a function that returns it
    parse: Callable[[str, Any], Any] | None  # (name, value) -> value; None: a flag
    help: str  # for --help, without the default or a final full stop
    short: str | None = None
    repeatable: bool = False  # a list; each use adds one item (the first replaces the default)
    # What a config file or keyword gives (each item, if repeatable), and a
    # value (or item) as a command-line value: the parser's, if it says.
    kind: Kind | None = None
    unparse: Callable[[Any], str] | None = None
    shown: str | None = None  # the default as --help shows it, if not the value itself
    from_python: Callable[[Any], Any] | None = None  # normalises a config file's value
    in_file: bool = True  # may a config file or keyword give it?

    def __post_init__(self):
        for field, fallback in (("kind", STRING), ("unparse", str)):
            if getattr(self, field) is None:
                object.__setattr__(self, field, getattr(self.parse, field, fallback))

    @property
    def flag(self) -> bool:
        return self.parse is None

    def default_value(self):
        value = self.default() if callable(self.default) else self.default
        return list(value) if isinstance(value, list) else value

    def doc(self) -> str:
        shown = self.shown
        if shown is None and not self.flag and not callable(self.default):
            if self.repeatable:
                shown = ", ".join(map(self.unparse, self.default)) or None
            elif self.default is not None:
                shown = self.unparse(self.default)
        return self.help + (f" [default: {shown}]" if shown is not None else "") + "."


_WHOLE_ANY = values.whole(0)
# Endpoint types whose sockets can be shared by several web processes.
SHARED_ENDPOINTS = ("tcp", "tcp6", "unix", "systemd")

OPTIONS: tuple[Option, ...] = (
    Option("settings", lambda: os.environ.get("DJANGO_SETTINGS_MODULE"), values.module_path,
           "Dotted path of the Django settings module", short="s", shown="$DJANGO_SETTINGS_MODULE"),
    Option("app", None, values.app_spec, "A site in one file or module: FILE.py[:NAME] or "
           "MODULE:NAME, a view, a Router, URL patterns or a WSGI application (docs/one-file.md)",
           shown="none"),
    Option("set", [], values.setting, "A Django setting for --app without --settings, as NAME=VALUE "
           "(VALUE in JSON, or text; repeatable)", repeatable=True, kind=STRINGS,
           from_python=setting_values),
    Option("migrate", False, None, "Apply the migrations and create the tables of models without "
           "migrations (those of an --app file), then exit", in_file=False),
    Option("pythonpath", [], values.existing_directory, "Directory to put on sys.path (repeatable). "
           "The working directory always is", repeatable=True),
    Option("listen", [DEFAULT_LISTEN], values.server_endpoint, "Endpoint to serve HTTP on (repeatable)",
           short="l", repeatable=True),
    Option("threads", 8, values.whole(), "Threads that run the Django application"),
    Option("web-workers", 1, values.count_or_auto, "Web processes of --threads threads each "
           "('auto': one per core); beyond 1, this process runs the jobs and hooks only"),
    Option("graceful-timeout", 30.0, values.seconds, "Seconds that draining requests, jobs and "
           "shut-down hooks may take together"),
    Option("static", [], values.static_mapping, "Serve DIR at URL PREFIX from the reactor, as PREFIX=DIR "
           "(repeatable)", repeatable=True, shown="STATIC_URL=STATIC_ROOT when both are local",
           unparse="=".join, from_python=static_values),
    Option("no-static", False, None, "Serve no static files from the reactor, not even STATIC_ROOT"),
    Option("access-log", None, values.access_log_file, "Write an access log in combined log format to "
           "FILE ('-' for the server log)"),
    Option("access-log-format", "combined", logs.access_log_format, "Format of --access-log lines: "
           "'combined', or 'combined+duration' (then ' rt=SECONDS', the request's duration)"),
    Option("log-level", "info", logs.log_level, "Lowest level of the server log's lines, for "
           "Twisted's and stdlib logging's: debug, info, warn or error"),
    Option("log-format", "text", logs.log_format, "Format of the server log: 'text' (twistd's), "
           "or 'json' (one JSON object a line)"),
    Option("max-body-size", 10 * MiB, _WHOLE_ANY, "Largest request body accepted, in bytes; "
           "larger ones get 413 unread"),
    Option("max-waiting", 100, _WHOLE_ANY, "Requests that may wait for a busy thread pool "
           "before new ones get 503"),
    Option("header-timeout", 60.0, values.seconds, "Seconds a client has to send a whole request "
           "head, from the connection or the request's first byte; then 408 (0: no limit)"),
    Option("max-header-size", 64 * 1024, values.whole(1024), "Largest request head (request line "
           "and headers), in bytes; larger ones get 431"),
    Option("max-connections", None, values.whole(1), "Open HTTP connections at most; one more "
           "closes the one waiting longest for a request head", shown="the open-file limit minus "
           "128, 4 per thread and 10 per worker"),
    Option("write-timeout", 60.0, values.seconds, "Seconds a client may take no byte of a response "
           "before its connection is cut (0: no limit)"),
    Option("stream-threads", None, values.whole(1), "Threads that may stream a response at once; "
           "one more gets 503", shown="half of --threads, at least 1"),
    Option("proxy-headers", False, None, "Trust X-Forwarded-For and X-Forwarded-Proto from "
           "--forwarded-allow-ips"),
    Option("forwarded-allow-ips", ["127.0.0.1"], values.networks, "Addresses or networks "
           "(comma-separated, or '*') whose X-Forwarded-* headers are trusted"),
    Option("health-path", "/-/health", values.url_path, "Path of the health endpoint, answered by "
           "the reactor"),
    Option("metrics-path", "/-/metrics", values.url_path, "Path of the Prometheus metrics endpoint, "
           "answered by the reactor"),
    Option("metrics-allow-ips", ["127.0.0.1", "::1"], values.networks, "Addresses or networks "
           "(comma-separated, or '*') that may read the metrics endpoint"),
    Option("no-metrics", False, None, "Serve no metrics endpoint and keep no metrics"),
    Option("metrics-listen", None, values.server_endpoint, "Also serve the metrics and health "
           "endpoints, and nothing else, there (a --jobs-only node's HTTP port)", shown="off"),
    Option("health-listen", None, values.server_endpoint, "Also serve the health endpoint, and "
           "nothing else, there (a --jobs-only node's, or a port for checks)", shown="off"),
    Option("health-requires-jobs", False, None, "Answer the health endpoint with 503 ('degraded') "
           "while no job node of --jobs-connect answers (by default, the link is only reported)"),
    # The job service.
    Option("state-dir", ".lrp", values.text, "Directory for the job service's socket and state"),
    Option("jobs-listen", None, values.server_endpoint, "AMP endpoint of the job service",
           shown="unix:<state-dir>/jobs.sock, mode 0600"),
    Option("pb-listen", None, values.server_endpoint, "Perspective Broker endpoint of the job service",
           shown="off"),
    Option("jobs-secret-file", None, values.existing_file, "File holding the shared secret that job "
           "clients must prove they know"),
    Option("allow-open-permissions", False, None, "Start even if group or others may read "
           "--jobs-secret-file or write to --state-dir"),
    Option("jobs-connect", [], values.client_endpoint, "Run no job service; send jobs to the job "
           "node at this client endpoint (repeatable: the first that answers, the next once lost)",
           repeatable=True),
    Option("job-threads", None, values.whole(1), "Threads that may wait for the job service at "
           "once; one more raises JobServiceUnavailable", shown="half of --threads, at least 1"),
    Option("no-jobs", False, None, "Run no job service and no workers in this process"),
    Option("jobs-only", False, None, "Run the job service and workers, but no web server"),
    Option("workers", 2, _WHOLE_ANY, "Worker processes that run jobs"),
    Option("max-jobs-per-worker", 1000, values.whole(), "Replace a worker after it ran this many jobs"),
    Option("max-worker-memory", 0, _WHOLE_ANY, "Replace a worker whose resident memory exceeds "
           "this many MB (0: no limit)"),
    Option("no-worker-template", False, None, "Start each replacement worker as a new process that "
           "sets Django up, instead of forking it from a Django-ready template"),
    Option("max-job-payload", MiB, values.whole(1024), "Largest job arguments or result, in bytes"),
    Option("queues", None, values.names, "Run only the jobs of these queues (comma-separated)",
           shown="all"),
    Option("node-name", None, values.text, "Name of this job node in the node table, unique among "
           "the nodes sharing the database", shown="<host name>:<absolute state-dir>"),
    # Development and deployment.
    Option("reload", False, None, "Development: restart the server when a source file changes"),
    Option("config", None, values.existing_file, "TOML file whose keys are these long option names; "
           "the command line wins", in_file=False),
)  # fmt: skip
_BY_NAME = {option.name: option for option in OPTIONS}
# Options that cannot be given together (their error message names them in this order).
_EXCLUSIVE = (
    ("no-jobs", "jobs-only"),
    ("jobs-connect", "jobs-only"),
    ("metrics-listen", "no-metrics"),
)

# Options of other servers that people type by habit: what to say instead of
# "did you mean" from difflib. Keys are spelled as typed.
_HINTS: dict[str, tuple[str, str]] = {
    "--bind": ("--listen", ""),
    "-b": ("--listen", ""),
    "-w": (
        "--web-workers (web processes) or --threads (threads per process)",
        "twistedlrp's --workers are job worker processes",
    ),
    "-c": ("--config", ""),
    "-h": ("--help", ""),
}


class Options(usage.Options):
    """Options for C{twistd lrp}; L{given} says which were given, and where."""

    synopsis = "[options]"
    longdesc = (
        "Serve a Django site: views from a thread pool, static files and a health "
        "endpoint from the reactor, long jobs in worker processes. Start-up hooks "
        "run before the ports open; SIGTERM or SIGINT shuts down gracefully."
    )
    # The long names that a --config file or make_service() may set.
    option_names = frozenset(option.name for option in OPTIONS if option.in_file)

    def __init__(self, checked: bool = True):
        super().__init__()
        # Unchecked: serve() adds its keywords before the check (--set needs --app).
        self.checked = checked
        for option in OPTIONS:
            self[option.name] = option.default_value()
        # Long name -> COMMAND_LINE or CONFIG_FILE, for each option given.
        self.given: dict[str, str] = {}

    def _take(self, option: Option, value) -> None:
        value = True if option.flag else option.parse(option.name, value)
        if not option.repeatable:
            self[option.name] = value
        elif self.given.get(option.name) != COMMAND_LINE:
            self[option.name] = [value]
        else:
            self[option.name].append(value)
        self.given[option.name] = COMMAND_LINE

    def opt_version(self):
        """Display the versions of twistedlrp, Twisted, Django and Python, and exit."""
        import django

        import twisted
        import twistedlrp

        python = ".".join(map(str, sys.version_info[:3]))
        sys.stdout.write(
            f"twistedlrp {twistedlrp.__version__} (Twisted {twisted.__version__}, "
            f"Django {django.get_version()}, Python {python})\n"
        )
        sys.exit(0)

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        if not (len(options) > 1 and options[-2] == "--_shell-completion"):
            self._refuse_unknown(options)
        super().parseOptions(options)

    def _refuse_unknown(self, args: list[str]) -> None:
        """Refuse unknown options: getopt would take a prefix (C{--thread}) for the option."""
        longs = {name.removesuffix("="): name.endswith("=") for name in self.longOpt}
        shorts = {c: self.shortOpt[i + 1 : i + 2] == ":" for i, c in enumerate(self.shortOpt)}
        shorts.pop(":", None)
        rest = iter(args)
        for arg in rest:
            if arg == "--" or arg == "-" or not arg.startswith("-"):
                return  # getopt stops here too
            if arg.startswith("--"):
                name, equals, _ = arg[2:].partition("=")
                if name not in longs:
                    raise usage.UsageError(_unknown("--" + name, longs))
                if longs[name] and not equals:
                    next(rest, None)
                continue
            for i, char in enumerate(arg[1:], 1):
                if char not in shorts:
                    word = arg[1:].partition("=")[0]
                    if i == 1 and len(word) > 1 and _suggest(word, longs):
                        raise usage.UsageError(_unknown("-" + word, longs))
                    raise usage.UsageError(_unknown("-" + char, longs))
                if shorts[char]:
                    if i == len(arg) - 1:
                        next(rest, None)
                    break

    def postOptions(self):
        if self["config"]:
            apply_config_file(self, self["config"])
        if self.checked:
            self.check()

    def set_option(self, name: str, value, source: str = COMMAND_LINE) -> None:
        """Set option C{name} from a Python value; @raise UsageError: a wrong name or value."""
        option = _BY_NAME.get(name)
        if option is None or not option.in_file:
            raise usage.UsageError(f"unknown option {name!r}")
        value = python_value(option, value)
        if option.repeatable:
            self[name] = [option.parse(name, item) for item in value]
        else:
            self[name] = value if option.flag else option.parse(name, value)
        self.given[name] = source

    def to_argv(self, exclude: Collection[str] = (), *, include_file: bool = False) -> list[str]:
        """
        @return: the arguments (C{["--threads=4"]}) of the options given on the
            command line or by L{set_option} (and the C{--config} file's with
            C{include_file}) but C{exclude}; parsed again, the same values.
        """
        sources = {COMMAND_LINE, CONFIG_FILE} if include_file else {COMMAND_LINE}
        args = []
        for option in OPTIONS:
            if option.name in exclude or self.given.get(option.name) not in sources:
                continue
            value = self[option.name]
            if option.flag:
                args += [f"--{option.name}"] if value else []
            elif option.repeatable:
                args += [f"--{option.name}={option.unparse(item)}" for item in value]
            elif value is not None:
                args.append(f"--{option.name}={option.unparse(value)}")
        return args

    def check(self) -> None:
        """@raise usage.UsageError: two options conflict or a required one is missing."""
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["set"] and (not self["app"] or self.given.get("settings")):
            raise usage.UsageError(
                "--set gives settings to a site given with --app and no --settings "
                "(a settings module sets its own)"
            )
        for one, other in _EXCLUSIVE:
            if self[one] and self[other]:
                raise usage.UsageError(f"--{one} and --{other} exclude each other")
        if self["web-workers"] > 1:
            if self["jobs-only"] and self.given.get("web-workers"):
                raise usage.UsageError("--web-workers and --jobs-only exclude each other")
            for endpoint in self["listen"]:
                kind = endpoint.split(":", 1)[0].strip().lower()
                if kind not in SHARED_ENDPOINTS:
                    raise usage.UsageError(
                        f"--web-workers {self['web-workers']}: --listen {endpoint} cannot be "
                        f"shared by several web processes (use tcp:, tcp6:, unix: or systemd:)"
                    )
        if not self["no-metrics"] and self["metrics-path"] == self["health-path"]:
            raise usage.UsageError(f"--metrics-path {self['metrics-path']} is --health-path too")
        for name in ("jobs-listen", "pb-listen"):
            endpoint = self[name]
            if endpoint and not endpoint.startswith("unix:") and not self["jobs-secret-file"]:
                raise usage.UsageError(
                    f"--{name}: a network listener ({endpoint}) requires --jobs-secret-file"
                )
        secret_file = self["jobs-secret-file"]
        if secret_file:
            values.private_file("jobs-secret-file", secret_file, self["allow-open-permissions"])
            with open(secret_file, "rb") as f:
                if not f.read().strip():
                    raise usage.UsageError(f"--jobs-secret-file: {secret_file} is empty")


def _handler(option: Option):
    """The C{opt_} method of C{option} (usage.Options reads a flag from its arity)."""
    if option.flag:
        handler = lambda self: self._take(option, True)  # noqa: E731
    else:
        handler = lambda self, value: self._take(option, value)  # noqa: E731
    handler.__name__ = "opt_" + option.name.replace("-", "_")
    handler.__doc__ = option.doc()  # its --help text
    return handler


for _option in OPTIONS:
    setattr(Options, "opt_" + _option.name.replace("-", "_"), _handler(_option))
    if _option.short:
        setattr(Options, "opt_" + _option.short, getattr(Options, "opt_" + _option.name))
del _option


class TapOptions(Options):
    """A wrong value ends C{twistd lrp} with one line on stderr, not twistd's usage text."""

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd lrp: error: {e}") from None


def _suggest(word: str, names: Collection[str]) -> list[str]:
    """@return: the known long names that C{word} starts, or else the closest one."""
    starts = sorted(name for name in names if word and name.startswith(word))
    return starts or difflib.get_close_matches(word, names, n=1)


def _unknown(given: str, names: Collection[str]) -> str:
    suggestion, note = _HINTS.get(given, ("", ""))
    # A short option's one letter says too little to guess from (-q is not --queues).
    if not suggestion and not (len(given) == 2 and given[0] == "-" and given[1] != "-"):
        matches = [f"--{name}" for name in _suggest(given.lstrip("-"), names)]
        suggestion = matches[0] if len(matches) == 1 else ""
        if len(matches) > 1:
            suggestion = "one of " + ", ".join(matches[:-1]) + " or " + matches[-1]
    if not suggestion:
        return f"unknown option {given}"
    return f"unknown option {given} (did you mean {suggestion}?{' ' + note if note else ''})"


def options_from_kwargs(**kwargs) -> Options:
    """@return: checked L{Options} from keywords (C{graceful_timeout=5}); @raise UsageError."""
    options = Options()
    config = kwargs.pop("config", None)
    for key, value in kwargs.items():
        name = key.replace("_", "-")
        if name not in options.option_names:
            raise usage.UsageError(f"unknown option {key!r}")
        options.set_option(name, value)
    if config:
        options.opt_config(config)
    options.postOptions()
    return options
