"""
Options given as Python values: ``--config FILE`` (TOML; the long option
names as keys, at the top level or in a ``[lrp]`` table) and
:func:`twistedlrp.make_service` keywords. The command line wins over the file.
"""

from __future__ import annotations

import json
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
