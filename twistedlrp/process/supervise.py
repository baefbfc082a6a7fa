"""
What the reload supervisor, the web processes and the worker pool do alike:
the environment, the signals, the restart back-off and the stop within a
deadline. (Twisted only where it waits: a worker uses it too.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from twistedlrp.backoff import Backoff

if TYPE_CHECKING:
    from twisted.internet import defer

# Restarts of a process that keeps ending: 0.5 s, doubling up to 30 s; one
# that ran RESET_AFTER seconds starts the count again.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
RESET_AFTER = 10.0


def restart_backoff() -> Backoff:
    return Backoff(FIRST_DELAY, MAX_DELAY)


def restart_delay(backoff: Backoff, ran: float) -> float:
    """@return: how long to wait before starting again a process that ended after C{ran} s."""
    if ran >= RESET_AFTER:
        backoff.reset()
    return backoff.next()


def child_environment() -> dict:
    """@return: our environment for a child, without the C{LISTEN_*} of the sockets we got."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}


def send_signal(pid: int | None, number: int, group: bool = False) -> bool:
    """Signal process C{pid} (or its C{group}); @return: whether it was sent."""
    if not pid:
        return False
    try:
        (os.killpg if group else os.kill)(pid, number)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def end_own_group() -> None:
    """SIGKILL the group we lead (what a job started) and us: the parent may be gone."""
    group = os.getpid()
    with contextlib.suppress(OSError):
        if os.getpgrp() == group and _others_in_group(group):
            os.killpg(group, signal.SIGKILL)


def _others_in_group(group: int) -> bool:
    """@return: whether a live process other than this one is in C{group} (true if unknown)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    me = str(os.getpid())
    for name in names:
        if not name.isdigit() or name == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != b"Z" and fields[2] == str(group).encode():
            return True
    return False


async def ended_within(reactor, ended: defer.Deferred, seconds: float, what=None) -> bool:
    """@return: whether C{ended} fired within C{seconds} (it is not cancelled)."""
    from twisted.internet import defer

    from twistedlrp.ordered_service import within

    waiting = defer.Deferred()
    ended.addBoth(lambda _: None if waiting.called else waiting.callback(None))
    return await within(reactor, waiting, seconds, what)


async def stop_within(
    reactor,
    ended: defer.Deferred,
    send: Callable[[int], object],
    seconds: float,
    on_late: Callable[[], object] | None = None,
    after_kill: float | None = None,
) -> bool:
    """
    C{send(SIGTERM)}, wait up to C{seconds} for C{ended}, then C{on_late()},
    C{send(SIGKILL)} and wait again (at most C{after_kill} s); @return: whether it ended in time.
    """
    send(signal.SIGTERM)
    if await ended_within(reactor, ended, seconds):
        return True
    if on_late is not None:
        on_late()
    send(signal.SIGKILL)
    if after_kill is None:
        await ended
    elif not ended.called:
        await ended_within(reactor, ended, after_kill, "waiting for killed processes")
    return False
