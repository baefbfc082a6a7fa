"""
The parsers of option values: C{(long name, value) -> value to store}, or
L{usage.UsageError} with a one-line message that names the option.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.python import usage

from twistedlrp.config import SECONDS, STRINGS, WHOLE, WHOLE_OR_AUTO

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
