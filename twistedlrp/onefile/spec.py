"""
What ``--app`` names: a file (``hello.py``, ``path/to/hello.py:index``: a
name ending in ``.py`` or with a slash) or a module on ``sys.path``
(``pkg.module:site``). No Django and no Twisted here.
"""

from __future__ import annotations

import keyword
import os
from dataclasses import dataclass

#: The names looked up, in this order, when C{--app} names no object.
DEFAULT_NAMES = ("app", "application", "urlpatterns")


class SpecError(ValueError):
    """The C{--app} value is malformed or names a file that does not exist."""


@dataclass(frozen=True)
class AppSpec:
    """A parsed C{--app} value."""

    given: str  # as typed
    module: str  # the name the module is imported under
    path: str | None  # the file's absolute path, or None for a module
    attr: str | None  # the object's name in the module, or None: DEFAULT_NAMES

    @property
    def directory(self) -> str | None:
        return os.path.dirname(self.path) if self.path else None

    @property
    def label(self) -> str:
        """How messages name the site: the file's name, or the module's."""
        return os.path.basename(self.path) if self.path else self.module

    @classmethod
    def of_file(cls, path: str, attr: str | None = None, given: str | None = None) -> AppSpec:
        """@return: the spec of the file at C{path}, imported under its name."""
        path = os.path.abspath(path)
        return cls(given or path, os.path.splitext(os.path.basename(path))[0], path, attr)

    def as_value(self) -> str:
        """@return: the C{--app} value, independent of the working directory."""
        target = self.path or self.module
        return f"{target}:{self.attr}" if self.attr else target


def _identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def parse(value: str) -> AppSpec:
    """@return: the parsed C{value}. @raise SpecError: with a one-line message."""
    value = str(value).strip()
    if not value:
        raise SpecError("expected FILE.py[:NAME] or MODULE[:NAME], got nothing")
    target, sep, attr = value.rpartition(":")
    if not sep:
        target, attr = value, None
    elif not attr or not all(_identifier(part) for part in attr.split(".")):
        raise SpecError(f"{value}: {attr!r} is not a name of an object (FILE.py:NAME)")
    if target.endswith(".py") or "/" in target or os.sep in target:
        spec = AppSpec.of_file(target, attr, given=value)
        if not os.path.isfile(spec.path):
            raise SpecError(f"{value}: no such file: {spec.path}")
        if not _identifier(spec.module):
            raise SpecError(
                f"{value}: the file's name must be a Python name to import it by "
                f"(letters, digits, underscores), not {spec.module!r}"
            )
        return spec
    if not target or not all(_identifier(part) for part in target.split(".")):
        raise SpecError(f"{value}: expected FILE.py[:NAME] or MODULE[:NAME]")
    return AppSpec(value, target, None, attr)
