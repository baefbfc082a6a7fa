"""
Every use twistedlrp makes of a private attribute of Twisted or Django, in
one place.

Each has no public API that does the same (the comment at each names the
upstream ticket filed or to file), and each has a test in
C{tests/unit/test_compat_*.py} that fails loudly, naming the internal, when
a new release of Twisted or Django changes it. Nothing else in twistedlrp
touches a private attribute of an object it did not define.
"""

# -- Twisted: listening ports and HTTP -----------------------------------


# -- Twisted: AMP and transports -------------------------------------------


# -- Twisted: the reactor, in a forked process -----------------------------
#
# A web process forked from the web template inherits a reactor that setting
# Django up imported (installed) but never ran: its epoll or poll object and
# its waker's pipe are shared with the template and every other fork. Twisted
# has no public way to give a reactor new ones after a fork (to file: "a
# reactor installed before os.fork() cannot be used in the child; offer a
# public reset, as asyncio's event loop policies and gevent's reinit do").
# Each attribute read or written here has a test in
# tests/unit/test_compat_fork.py.

_RENEWABLE_REACTORS = ("EPollReactor", "PollReactor", "SelectReactor")


def reactor_renewable(reactor) -> bool:
    """
    @return: whether a forked process can give C{reactor} (installed, not
        running) a poller and a waker of its own (L{renew_forked_reactor}):
        an epoll, poll or select reactor that never ran and watches nothing
        but its waker.
    """
    if type(reactor).__name__ not in _RENEWABLE_REACTORS:
        return False
    # _started, _startedBefore: set by startRunning, never reset by a stop.
    if reactor.running or reactor._started or reactor._startedBefore:
        return False
    waker = reactor.waker
    return set(reactor.getReaders()) <= {waker} and not reactor.getWriters()


def renew_forked_reactor() -> None:
    """
    In a forked process: the inherited (never run) reactor, if there is
    one, gets a new poller and a new waker, so that it shares no kernel
    object with its parent or another fork.
    """
    import select
    import sys

    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return
    kind = type(reactor).__name__
    if kind == "EPollReactor":
        old, reactor._poller = reactor._poller, select.epoll(1024)
        old.close()  # our descriptor only: the epoll instance lives on elsewhere
    elif kind == "PollReactor":
        reactor._poller = select.poll()
    reactor._reads.clear()
    reactor._writes.clear()
    if kind != "SelectReactor":
        reactor._selectables.clear()
    waker = reactor.waker
    if waker is not None:
        reactor._internalReaders.discard(waker)
        waker.connectionLost(None)  # closes the inherited pipe's ends
        reactor.waker = None
    reactor.installWaker()


# -- Django ------------------------------------------------------------------
