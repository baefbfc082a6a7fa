"""
twistedlrp.signals: the stop signals replace the reactor's handlers only
where the reactor installed its own (it always sets SIGTERM's then).
"""

import signal

import pytest

from twistedlrp.signals import StopSignals


@pytest.fixture
def restored():
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.mark.parametrize("reactor_handles", [True, False])
def test_handlers_are_replaced_only_where_the_reactor_set_its_own(restored, reactor_handles):
    signal.signal(signal.SIGTERM, (lambda *a: None) if reactor_handles else signal.SIG_DFL)
    before = signal.getsignal(signal.SIGINT)
    stops = StopSignals(None, lambda name: None, lambda name: None)
    stops.install()
    assert stops.installed is reactor_handles
    if reactor_handles:
        assert signal.getsignal(signal.SIGTERM) == stops._received
        assert signal.getsignal(signal.SIGINT) == stops._received
    else:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == before
