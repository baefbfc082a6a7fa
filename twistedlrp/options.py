"""
The options of ``twistd lrp``, shared by the command line, ``--config`` files
and :func:`twistedlrp.make_service`.

Every option has one ``opt_`` method that checks its value and stores it
under the option's long name (``self["graceful-timeout"]``). A wrong value
raises :class:`usage.UsageError` with a one-line message naming the option.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib

from twisted.python import usage

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
MiB = 1024 * 1024

# Options whose value is a list and that may be given more than once.
_LIST_OPTIONS = {"pythonpath", "listen", "static"}
# Options whose value is a whole number, or any number.
_INT_OPTIONS = {
    "threads",
    "max-body-size",
    "max-waiting",
    "workers",
    "max-jobs-per-worker",
    "max-worker-memory",
    "max-job-payload",
}
_NUMBER_OPTIONS = {"graceful-timeout"}
# Options that take no value.
_FLAGS = {
    "proxy-headers",
    "no-jobs",
    "jobs-only",
    "reload",
    "no-static",
}


def _positive_int(option: str, value, minimum: int = 1) -> int:
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{option}: expected a whole number, got {value!r}") from None
    if number < minimum:
        raise usage.UsageError(f"--{option}: must be at least {minimum}, got {number}")
    return number


def _seconds(option: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{option}: expected a number of seconds, got {value!r}") from None
    if number < 0 or number != number:
        raise usage.UsageError(f"--{option}: must not be negative, got {value!r}")
    return number


def _endpoint(option: str, value) -> str:
    """Check that C{value} parses as a Twisted server endpoint description."""
    if not isinstance(value, str) or not value.strip():
        raise usage.UsageError(f"--{option}: expected an endpoint string such as tcp:8000")
    from twisted.internet.endpoints import _parseServer

    try:
        _parseServer(value, None)
    except Exception as e:
        raise usage.UsageError(f"--{option}: bad endpoint {value!r}: {e}") from None
    return value


def _client_endpoint(option: str, value) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise usage.UsageError(
            f"--{option}: expected a client endpoint string such as unix:path=.lrp/jobs.sock"
        )
    return value


class Options(usage.Options):
    """
    Options for C{twistd lrp}. Values are stored under the long option names.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve a Django site: views from a thread pool, static files and a health "
        "endpoint from the reactor, long jobs in worker processes. Start-up hooks "
        "run before the ports open; SIGTERM or SIGINT shuts down gracefully."
    )

    def __init__(self):
        super().__init__()
        self["settings"] = os.environ.get("DJANGO_SETTINGS_MODULE")
        self["pythonpath"] = []
        self["listen"] = []
        self["threads"] = 8
        self["graceful-timeout"] = 30.0
        self["static"] = []
        self["no-static"] = False
        self["access-log"] = None
        self["max-body-size"] = 10 * MiB
        self["max-waiting"] = 100
        self["proxy-headers"] = False
        self["forwarded-allow-ips"] = ["127.0.0.1"]
        self["health-path"] = "/-/health"
        # The job service.
        self["state-dir"] = ".lrp"
        self["jobs-listen"] = None
        self["pb-listen"] = None
        self["jobs-secret-file"] = None
        self["jobs-connect"] = None
        self["no-jobs"] = False
        self["jobs-only"] = False
        self["workers"] = 2
        self["max-jobs-per-worker"] = 1000
        self["max-worker-memory"] = 0
        self["max-job-payload"] = MiB
        # Development and deployment.
        self["reload"] = False
        self["config"] = None
        self._explicit: set[str] = set()
        self._from_file: set[str] = set()
        # The long names that a --config file or make_service() may set.
        self.option_names = frozenset(self) - {"config"}

    # -- parsing --------------------------------------------------------

    def _set(self, name: str, value) -> None:
        self._explicit.add(name)
        self[name] = value

    def opt_settings(self, module):
        """Dotted path of the Django settings module (default: $DJANGO_SETTINGS_MODULE)."""
        if not module or not all(part.isidentifier() for part in module.split(".")):
            raise usage.UsageError(f"--settings: not a module path: {module!r}")
        self._set("settings", module)

    def opt_pythonpath(self, directory):
        """Directory to put on sys.path (repeatable). The working directory always is."""
        if not os.path.isdir(directory):
            raise usage.UsageError(f"--pythonpath: no such directory: {directory!r}")
        self._explicit.add("pythonpath")
        self["pythonpath"].append(os.path.abspath(directory))

    def opt_listen(self, endpoint):
        """Endpoint to serve HTTP on (repeatable) [default: tcp:8000:interface=127.0.0.1]."""
        self._explicit.add("listen")
        self["listen"].append(_endpoint("listen", endpoint))

    def opt_threads(self, count):
        """Threads that run the Django application [default: 8]."""
        self._set("threads", _positive_int("threads", count))

    def opt_graceful_timeout(self, seconds):
        """Seconds that draining requests, jobs and shut-down hooks may take together [default: 30]."""
        self._set("graceful-timeout", _seconds("graceful-timeout", seconds))

    def opt_static(self, mapping):
        """Serve DIR at URL PREFIX from the reactor, as PREFIX=DIR (repeatable) [default: STATIC_URL=STATIC_ROOT when both are local]."""
        prefix, sep, directory = str(mapping).partition("=")
        if not sep or not prefix.startswith("/") or not directory:
            raise usage.UsageError(
                f"--static: expected PREFIX=DIR such as /static/=staticfiles, got {mapping!r}"
            )
        if not os.path.isdir(directory):
            raise usage.UsageError(f"--static: no such directory: {directory!r}")
        self._explicit.add("static")
        self["static"].append((prefix, os.path.abspath(directory)))

    def opt_no_static(self):
        """Serve no static files from the reactor, not even STATIC_ROOT."""
        self._set("no-static", True)

    def opt_access_log(self, path):
        """Write an access log in combined log format to FILE ('-' for the server log)."""
        if not path:
            raise usage.UsageError("--access-log: expected a file name or '-'")
        if path != "-":
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise usage.UsageError(f"--access-log: no such directory: {parent!r}")
        self._set("access-log", path)

    def opt_max_body_size(self, size):
        """Largest request body accepted, in bytes; larger ones get 413 unread [default: 10485760]."""
        self._set("max-body-size", _positive_int("max-body-size", size, minimum=0))

    def opt_max_waiting(self, count):
        """Requests that may wait for a busy thread pool before new ones get 503 [default: 100]."""
        self._set("max-waiting", _positive_int("max-waiting", count, minimum=0))

    def opt_proxy_headers(self):
        """Trust X-Forwarded-For and X-Forwarded-Proto from --forwarded-allow-ips."""
        self._set("proxy-headers", True)

    def opt_forwarded_allow_ips(self, addresses):
        """Addresses or networks (comma-separated, or '*') whose X-Forwarded-* headers are trusted [default: 127.0.0.1]."""
        items = addresses if isinstance(addresses, list) else str(addresses).split(",")
        parsed = []
        for item in (str(i).strip() for i in items):
            if not item:
                continue
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise usage.UsageError(
                        f"--forwarded-allow-ips: not an address or network: {item!r}"
                    ) from None
            parsed.append(item)
        self._set("forwarded-allow-ips", parsed)

    def opt_health_path(self, path):
        """Path of the health endpoint, answered by the reactor [default: /-/health]."""
        if not path.startswith("/"):
            raise usage.UsageError(f"--health-path: must start with '/', got {path!r}")
        self._set("health-path", path)

    # -- the job service --------------------------------------------------

    def opt_state_dir(self, directory):
        """Directory for the job service's socket and state [default: .lrp]."""
        self._set("state-dir", directory)

    def opt_jobs_listen(self, endpoint):
        """AMP endpoint of the job service [default: unix:<state-dir>/jobs.sock, mode 0600]."""
        self._set("jobs-listen", _endpoint("jobs-listen", endpoint))

    def opt_pb_listen(self, endpoint):
        """Perspective Broker endpoint of the job service [default: off]."""
        self._set("pb-listen", _endpoint("pb-listen", endpoint))

    def opt_jobs_secret_file(self, path):
        """File holding the shared secret that job clients must prove they know."""
        if not os.path.isfile(path):
            raise usage.UsageError(f"--jobs-secret-file: no such file: {path!r}")
        self._set("jobs-secret-file", os.path.abspath(path))

    def opt_jobs_connect(self, endpoint):
        """Run no job service here; send jobs to the one at this client endpoint."""
        self._set("jobs-connect", _client_endpoint("jobs-connect", endpoint))

    def opt_no_jobs(self):
        """Run no job service and no workers in this process."""
        self._set("no-jobs", True)

    def opt_jobs_only(self):
        """Run the job service and workers, but no web server."""
        self._set("jobs-only", True)

    def opt_workers(self, count):
        """Worker processes that run jobs [default: 2]."""
        self._set("workers", _positive_int("workers", count, minimum=0))

    def opt_max_jobs_per_worker(self, count):
        """Replace a worker after it ran this many jobs [default: 1000]."""
        self._set("max-jobs-per-worker", _positive_int("max-jobs-per-worker", count))

    def opt_max_worker_memory(self, megabytes):
        """Replace a worker whose resident memory exceeds this many MB (0: no limit)."""
        self._set("max-worker-memory", _positive_int("max-worker-memory", megabytes, minimum=0))

    def opt_max_job_payload(self, size):
        """Largest job arguments or result, in bytes [default: 1048576]."""
        self._set("max-job-payload", _positive_int("max-job-payload", size, minimum=1024))

    # -- development and deployment -------------------------------------

    def opt_reload(self):
        """Development: restart the server when a source file changes."""
        self._set("reload", True)

    def opt_config(self, path):
        """TOML file whose keys are these long option names; the command line wins."""
        if not os.path.isfile(path):
            raise usage.UsageError(f"--config: no such file: {path!r}")
        self["config"] = os.path.abspath(path)

    opt_s = opt_settings
    opt_l = opt_listen

    # -- after parsing --------------------------------------------------

    def postOptions(self):
        # What the command line gave, before the file adds to it (the reload
        # supervisor passes these on to its servers, with --config).
        self.command_line = set(self._explicit)
        if self["config"]:
            self.apply_config_file(self["config"])
        self._from_file = set(self._explicit) - self.command_line
        self._explicit = self.command_line
        self.check()

    def apply_config_file(self, path: str) -> None:
        """
        Apply the options in the TOML file at C{path}, except those already
        given on the command line.

        @raise usage.UsageError: the file is not TOML, or has an unknown key
            or a value of the wrong type; the message names the key and file.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise usage.UsageError(f"--config: cannot read {path}: {e}") from None
        # A [lrp] table is accepted so the file can share a pyproject-style layout.
        if set(data) == {"lrp"} and isinstance(data["lrp"], dict):
            data = data["lrp"]
        for key, value in data.items():
            name = key.replace("_", "-")
            if name not in self.option_names:
                raise usage.UsageError(f"{path}: unknown option {key!r}")
            if name in self._explicit:
                continue
            try:
                self.set_option(name, value)
            except usage.UsageError as e:
                message = str(e).removeprefix(f"--{name}: ")
                raise usage.UsageError(f"{path}: {key}: {message}") from None

    def set_option(self, name: str, value) -> None:
        """
        Set option C{name} (its long name) from a Python value, with the same
        checks as the command line.

        @raise usage.UsageError: the value has the wrong type or is invalid.
        """
        if name not in self.option_names:
            raise usage.UsageError(f"unknown option {name!r}")
        method = getattr(self, "opt_" + name.replace("-", "_"))
        if name in _FLAGS:
            if not isinstance(value, bool):
                raise usage.UsageError(f"--{name}: expected true or false, got {_typed(value)}")
            if value:
                method()
            else:
                self._set(name, False)
            return
        if name in _LIST_OPTIONS:
            if name == "static" and isinstance(value, dict):
                # static = { "/static/" = "staticfiles" }
                value = [f"{prefix}={directory}" for prefix, directory in value.items()]
            elif name == "static" and isinstance(value, tuple):
                value = [value]
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list | tuple):
                raise usage.UsageError(f"--{name}: expected a list of strings, got {_typed(value)}")
            self[name] = []
            for item in values:
                if name == "static" and isinstance(item, list | tuple) and len(item) == 2:
                    item = f"{item[0]}={item[1]}"
                if not isinstance(item, str):
                    raise usage.UsageError(f"--{name}: expected strings, got {_typed(item)}")
                method(item)
            return
        if name in _INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise usage.UsageError(f"--{name}: expected a whole number, got {_typed(value)}")
        elif name in _NUMBER_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise usage.UsageError(
                    f"--{name}: expected a number of seconds, got {_typed(value)}"
                )
        elif name == "forwarded-allow-ips":
            if isinstance(value, list) and all(isinstance(i, str) for i in value):
                pass
            elif not isinstance(value, str):
                raise usage.UsageError(
                    f"--{name}: expected a string or a list of strings, got {_typed(value)}"
                )
        elif not isinstance(value, str):
            raise usage.UsageError(f"--{name}: expected a string, got {_typed(value)}")
        method(value)

    def check(self) -> None:
        """
        Check the options against each other.

        @raise usage.UsageError: two options conflict or a required one is missing.
        """
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["no-jobs"] and self["jobs-only"]:
            raise usage.UsageError("--no-jobs and --jobs-only exclude each other")
        if self["jobs-connect"] and self["jobs-only"]:
            raise usage.UsageError("--jobs-connect and --jobs-only exclude each other")
        for name in ("jobs-listen", "pb-listen"):
            endpoint = self[name]
            if endpoint and not endpoint.startswith("unix:") and not self["jobs-secret-file"]:
                raise usage.UsageError(
                    f"--{name}: a network listener ({endpoint}) requires --jobs-secret-file"
                )
        if self["jobs-secret-file"]:
            with open(self["jobs-secret-file"], "rb") as f:
                if not f.read().strip():
                    raise usage.UsageError(
                        f"--jobs-secret-file: {self['jobs-secret-file']} is empty"
                    )

    def to_argv(self, exclude=(), *, include_file: bool = False) -> list[str]:
        """
        The C{twistd lrp} arguments (C{["--threads=4", "--proxy-headers",
        "--static=/static/=/dir"]}) of the options given on the command line
        or through L{set_option} (C{make_service()} keywords), in a fixed
        order; with C{include_file}, also those taken from the C{--config}
        file. Options named in C{exclude} (long names) are left out, and so
        are flags that are off. Parsing the result with a fresh L{Options}
        gives the same values back.
        """
        names = set(self._explicit)
        if include_file:
            names |= self._from_file
        if self["config"]:
            names.add("config")
        args = []
        for name in sorted(names - set(exclude)):
            value = self[name]
            if name in _FLAGS:
                if value:
                    args.append(f"--{name}")
            elif name == "pythonpath" or name == "listen":
                args += [f"--{name}={item}" for item in value]
            elif name == "static":
                args += [f"--static={prefix}={directory}" for prefix, directory in value]
            elif name == "forwarded-allow-ips":
                args.append(f"--{name}={','.join(value)}")
            elif value is not None:
                args.append(f"--{name}={value}")
        return args

    def python_names(self) -> dict:
        """The options as a dict keyed by Python names (C{graceful_timeout})."""
        return {key.replace("-", "_"): value for key, value in self.items()}


class TapOptions(Options):
    """
    The options as C{twistd lrp} parses them: a wrong value ends the process
    with one line on stderr instead of twistd's full usage text.
    """

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd lrp: error: {e}") from None


def _typed(value) -> str:
    """C{value} for an error message, with its TOML type."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind = next((k for t, k in kinds.items() if type(value) is t), None)
    if kind is None:
        kind = (
            "a list"
            if isinstance(value, list | tuple)
            else "a table"
            if isinstance(value, dict)
            else type(value).__name__
        )
    return f"{kind} ({value!r})"


def options_from_kwargs(**kwargs) -> Options:
    """
    Build checked L{Options} from Python keyword arguments named like the
    options (C{threads=4}, C{listen=["tcp:0"]}, C{graceful_timeout=5}).

    @raise usage.UsageError: an unknown name or a wrong value.
    """
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
