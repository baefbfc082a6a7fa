"""
Option values: the parsers of command-line values (C{(long name, value) -> value
to store}), and options given as Python values: ``--config FILE`` (TOML; the long
option names as keys, at the top level or in a ``[lrp]`` table) and
:func:`twistedlrp.make_service` keywords. A wrong value raises L{usage.UsageError}
with a one-line message that names the option; the command line wins over the file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.python import usage

# Where a value came from (Options.given); make_service() keywords count as
# the command line: they win over the file, and --reload passes them on.
COMMAND_LINE = "command line"
CONFIG_FILE = "config file"


@dataclass(frozen=True)
class Kind:
    """The Python type a config file or keyword must give for an option."""

    description: str  # "expected <description>, got ..."
    accepts: Callable[[Any], bool]


def _no_bool(*types):
    return lambda v: isinstance(v, types) and not isinstance(v, bool)


FLAG = Kind("true or false", lambda v: isinstance(v, bool))
WHOLE = Kind("a whole number", _no_bool(int))
SECONDS = Kind("a number of seconds", _no_bool(int, float))
STRING = Kind("a string", lambda v: isinstance(v, str))
WHOLE_OR_AUTO = Kind("a whole number or 'auto'", lambda v: isinstance(v, str) or WHOLE.accepts(v))
STRINGS = Kind(
    "a string or a list of strings",
    lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(i, str) for i in v),
)


def python_value(option, value):
    """@return: C{value} for C{option}, a list if repeatable; @raise UsageError: a wrong type."""
    name = option.name
    if option.from_python:
        value = option.from_python(value)
    if option.repeatable:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list | tuple):
            raise usage.UsageError(f"--{name}: expected a list of strings, got {typed(value)}")
        for item in values:
            if not option.kind.accepts(item):
                raise usage.UsageError(f"--{name}: expected strings, got {typed(item)}")
        return list(values)
    kind = FLAG if option.flag else option.kind
    if not kind.accepts(value):
        raise usage.UsageError(f"--{name}: expected {kind.description}, got {typed(value)}")
    return value


def static_values(value):
    """C{static} as a table (C{{ "/static/" = "dir" }}), pairs or PREFIX=DIR strings."""
    if isinstance(value, dict):
        return [f"{prefix}={directory}" for prefix, directory in value.items()]
    if isinstance(value, tuple):
        value = [value]
    if isinstance(value, list):
        return [
            f"{i[0]}={i[1]}" if isinstance(i, list | tuple) and len(i) == 2 else i for i in value
        ]
    return value


def setting_values(value):
    """C{set} as a table (C{{ DEBUG = true }}): NAME=VALUE strings, each value in JSON."""
    if isinstance(value, dict):
        return [f"{name}={json.dumps(item)}" for name, item in value.items()]
    return value


_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_TOML_TYPES.update({list: "a list", tuple: "a list", dict: "a table"})


def typed(value) -> str:
    """C{value} for an error message, with its TOML type."""
    return f"{_TOML_TYPES.get(type(value), type(value).__name__)} ({value!r})"


def apply_config_file(options, path: str) -> None:
    """Set the options of the TOML file at C{path} but the command line's; @raise UsageError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise usage.UsageError(f"--config: cannot read {path}: {e}") from None
    if set(data) == {"lrp"} and isinstance(data["lrp"], dict):
        data = data["lrp"]
    for key, value in data.items():
        name = key.replace("_", "-")
        if name not in options.option_names:
            raise usage.UsageError(f"{path}: unknown option {key!r}")
        if options.given.get(name) == COMMAND_LINE:
            continue
        try:
            options.set_option(name, value, source=CONFIG_FILE)
        except usage.UsageError as e:
            message = str(e).removeprefix(f"--{name}: ")
            raise usage.UsageError(f"{path}: {key}: {message}") from None


# A parser may say what type a config file gives (C{kind}) and how a value
# is written on a command line (C{unparse}), for the options it parses.


def whole(minimum: int = 1) -> Callable[[str, Any], int]:
    def parse(option: str, value) -> int:
        try:
            number = int(value)
            if isinstance(value, float) and number != value:
                raise ValueError
        except (TypeError, ValueError):
            raise usage.UsageError(f"--{option}: expected a whole number, got {value!r}") from None
        if number < minimum:
            raise usage.UsageError(f"--{option}: must be at least {minimum}, got {number}")
        return number

    parse.kind = WHOLE
    return parse


def cpu_count() -> int:
    """@return: the cores this process may use (C{os.process_cpu_count()} from Python 3.13)."""
    return getattr(os, "process_cpu_count", os.cpu_count)() or 1


def count_or_auto(option: str, value) -> int:
    """A whole number of at least 1, or C{"auto"}: the number of cores (L{cpu_count})."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cpu_count()
    return whole(1)(option, value)


count_or_auto.kind = WHOLE_OR_AUTO


def seconds(option: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{option}: expected a number of seconds, got {value!r}") from None
    if number < 0 or number != number:
        raise usage.UsageError(f"--{option}: must not be negative, got {value!r}")
    return number


seconds.kind = SECONDS
seconds.unparse = lambda value: str(int(value)) if float(value).is_integer() else str(value)


def choice(*names: str, aliases: dict[str, str] | None = None) -> Callable[[str, Any], str]:
    """@return: a parser of one of C{names}, in any case (C{aliases} map other names to them)."""
    expected = " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)

    def parse(option: str, value) -> str:
        name = str(value).strip().lower()
        name = (aliases or {}).get(name, name)
        if name not in names:
            raise usage.UsageError(f"--{option}: expected {expected}, got {value!r}")
        return name

    return parse


def text(option: str, value) -> str:
    return value


def module_path(option: str, module) -> str:
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise usage.UsageError(f"--{option}: not a module path: {module!r}")
    return module


def existing_directory(option: str, directory) -> str:
    if not os.path.isdir(directory):
        raise usage.UsageError(f"--{option}: no such directory: {directory!r}")
    return os.path.abspath(directory)


def existing_file(option: str, path) -> str:
    if not os.path.isfile(path):
        raise usage.UsageError(f"--{option}: no such file: {path!r}")
    return os.path.abspath(path)


def permissions_problem(mode: int, mask: int = 0o077) -> str | None:
    """@return: what is wrong with C{mode} (C{"readable by others (mode 0644)"}), or C{None}."""
    bad = stat.S_IMODE(mode) & mask
    if not bad:
        return None
    who = "others" if bad & stat.S_IRWXO else "its group"
    if bad & (stat.S_IRGRP | stat.S_IROTH):
        what = "readable"
    elif bad & (stat.S_IWGRP | stat.S_IWOTH):
        what = "writable"
    else:
        what = "accessible"
    return f"{what} by {who} (mode {stat.S_IMODE(mode):04o})"


def private_file(option: str, path: str, allow_open: bool = False) -> None:
    """@raise usage.UsageError: C{path} is open to its group or others (as ssh has it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise usage.UsageError(f"--{option}: cannot read {path}: {e.strerror}") from None
    problem = permissions_problem(mode)
    if problem and not allow_open:
        raise usage.UsageError(
            f"--{option} {path} is {problem}: chmod 600 it, or pass --allow-open-permissions"
        )


def server_endpoint(option: str, value) -> str:
    """Check that C{value} makes a Twisted server endpoint (nothing listens yet)."""
    if not isinstance(value, str) or not value.strip():
        raise usage.UsageError(f"--{option}: expected an endpoint string such as tcp:8000")
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(None, value)
    except (IndexError, KeyError):  # systemd: with no such inherited socket
        raise usage.UsageError(
            f"--{option}: bad endpoint {value!r}: no such inherited socket"
        ) from None
    except Exception as e:
        raise usage.UsageError(f"--{option}: bad endpoint {value!r}: {e}") from None
    return value


def client_endpoint(option: str, value) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise usage.UsageError(
            f"--{option}: expected a client endpoint string such as unix:path=.lrp/jobs.sock"
        )
    return value


def static_mapping(option: str, mapping) -> tuple[str, str]:
    prefix, sep, directory = str(mapping).partition("=")
    if not sep or not prefix.startswith("/") or not directory:
        raise usage.UsageError(
            f"--{option}: expected PREFIX=DIR such as /static/=staticfiles, got {mapping!r}"
        )
    return prefix, existing_directory(option, directory)


def access_log_file(option: str, path) -> str:
    if not path:
        raise usage.UsageError(f"--{option}: expected a file name or '-'")
    if path != "-":
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise usage.UsageError(f"--{option}: no such directory: {parent!r}")
    return path


def networks(option: str, addresses) -> list[str]:
    parsed = names(option, addresses) or []
    for item in parsed:
        if item != "*":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise usage.UsageError(f"--{option}: not an address or network: {item!r}") from None
    return parsed


def names(option: str, value) -> list[str] | None:
    """Comma-separated names (or a list of them), or C{None} for none."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()] or None


networks.kind = names.kind = STRINGS
networks.unparse = names.unparse = ",".join


def url_path(option: str, path) -> str:
    if not path.startswith("/"):
        raise usage.UsageError(f"--{option}: must start with '/', got {path!r}")
    return path


def app_spec(option: str, value) -> str:
    """C{FILE.py[:NAME]} (an existing file) or C{MODULE[:NAME]} (L{twistedlrp.onefile.spec})."""
    from twistedlrp.onefile.spec import SpecError, parse

    try:
        parse(value)
    except SpecError as e:
        raise usage.UsageError(f"--{option} {e}") from None
    return str(value).strip()


def setting(option: str, value) -> str:
    """C{NAME=VALUE}, an upper-case setting's name (L{twistedlrp.onefile.defaults.decode_value})."""
    name, sep, _ = str(value).partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not name.isupper():
        raise usage.UsageError(
            f"--{option}: expected NAME=VALUE with an upper-case setting name, such as "
            f"DEBUG=true, got {value!r}"
        )
    return f"{name}={value.partition('=')[2]}"
