"""
The reactor internals that L{twistedlrp.compat} reads and writes to renew a
reactor in a forked process: each test fails, naming the internal, when a
Twisted release changes it (see the section "Twisted: the reactor, in a
forked process" there). Renewal itself is tested in
tests/unit/test_web_workers_fork.py.
"""

from __future__ import annotations

import pytest
from twisted.internet import epollreactor, pollreactor, selectreactor

from twistedlrp import compat

KINDS = [epollreactor.EPollReactor, pollreactor.PollReactor, selectreactor.SelectReactor]


@pytest.fixture(params=KINDS, ids=lambda kind: kind.__name__)
def reactor(request):
    """A reactor of each kind compat renews, never installed nor run."""
    made = request.param()
    yield made
    made.waker.connectionLost(None)
    poller = getattr(made, "_poller", None)
    if hasattr(poller, "close"):
        poller.close()


def test_the_kinds_are_named_as_compat_expects():
    assert sorted(kind.__name__ for kind in KINDS) == sorted(compat._RENEWABLE_REACTORS)


def test_started_flags(reactor):
    assert reactor._started is False, "ReactorBase._started changed"
    assert reactor._startedBefore is False, "ReactorBase._startedBefore changed"
    assert compat.reactor_renewable(reactor)


def test_waker_and_internal_readers(reactor):
    assert reactor.waker is not None, "PosixReactorBase.waker changed"
    assert reactor.waker in reactor._internalReaders, "PosixReactorBase._internalReaders changed"
    assert callable(reactor.installWaker), "PosixReactorBase.installWaker changed"


def test_descriptor_tables(reactor):
    for name in ("_reads", "_writes"):
        assert hasattr(getattr(reactor, name), "clear"), f"{type(reactor).__name__}.{name} changed"
    if not isinstance(reactor, selectreactor.SelectReactor):
        assert isinstance(reactor._selectables, dict), "_selectables changed"


def test_pollers():
    made = epollreactor.EPollReactor()
    try:
        assert hasattr(made._poller, "close") and hasattr(made._poller, "register"), (
            "EPollReactor._poller changed"
        )
    finally:
        made._poller.close()
        made.waker.connectionLost(None)
    made = pollreactor.PollReactor()
    try:
        assert hasattr(made._poller, "register"), "PollReactor._poller changed"
    finally:
        made.waker.connectionLost(None)
