"""How a process ended: the one description of an exit."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


@dataclass(frozen=True)
class Exit:
    """An exit code, or the signal that killed the process, or C{lost}: how the status was lost."""

    code: int | None = None
    signal: int | None = None
    lost: str | None = None

    @classmethod
    def of(cls, reason) -> Exit:
        """@return: the exit a process protocol's C{reason} (a Failure or its value) tells."""
        value = getattr(reason, "value", reason)
        lost = getattr(value, "how", None)
        code, number = getattr(value, "exitCode", None), getattr(value, "signal", None)
        return cls(None if number else code, number or None, lost)

    @classmethod
    def of_status(cls, status: int) -> Exit:
        """@return: the exit a C{waitpid} status tells."""
        code = os.waitstatus_to_exitcode(status)
        return cls(code, None) if code >= 0 else cls(None, -code)

    def status(self) -> str:
        """@return: C{"exit code 3"}, C{"signal SIGKILL"}."""
        if self.lost:
            return self.lost
        if self.signal:
            return f"signal {_signal_name(self.signal) or self.signal}"
        return f"exit code {self.code}"

    def __str__(self) -> str:
        """@return: C{"exited with code 3"}, C{"killed by signal 9 (SIGKILL)"}."""
        if self.lost:
            return self.lost
        if self.signal:
            return f"killed by signal {self.signal} ({_signal_name(self.signal) or 'unknown'})"
        return f"exited with code {self.code if self.code is not None else 0}"

    def reason(self):
        """@return: the exit as Twisted's C{ProcessDone} or C{ProcessTerminated}, in a Failure."""
        from twisted.internet import error
        from twisted.python.failure import Failure

        if self.code == 0:
            value = error.ProcessDone(0)
        else:
            value = error.ProcessTerminated(self.code, self.signal)
        if self.lost:
            value.how = self.lost
        return Failure(value)
