"""
A reactor installed but never run, renewed in a forked process
(twistedlrp.compat.renew_forked_reactor), in a fresh interpreter each time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = """
import os, sys
from twisted.internet import {module}
{module}.install()
from twisted.internet import reactor
from twistedlrp import compat

assert compat.reactor_renewable(reactor)
pids = []
for n in range(2):
    pid = os.fork()
    if pid == 0:
        compat.renew_forked_reactor()
        assert set(reactor.getReaders()) == {{reactor.waker}}
        done = []
        reactor.callLater(0.05, lambda: (done.append(1), reactor.stop()))
        reactor.callInThread(lambda: None)  # wakes the reactor through the new waker
        reactor.run(installSignalHandlers=False)
        os._exit(0 if done else 3)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
# The template's own reactor is untouched: it still can run.
reactor.callLater(0.01, reactor.stop)
reactor.run(installSignalHandlers=False)
print(codes)
"""


def run(module: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT.format(module=module))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_epoll_reactor_is_renewed_in_each_fork():
    assert run("epollreactor") == "[0, 0]"


def test_poll_reactor_is_renewed_in_each_fork():
    assert run("pollreactor") == "[0, 0]"


def test_a_reactor_that_ran_or_watches_something_is_not_refreshable():
    script = textwrap.dedent(
        """
        import os
        from twisted.internet import reactor
        from twistedlrp import compat
        r, w = os.pipe()

        class Reader:
            def fileno(self): return r
            def doRead(self): pass
            def connectionLost(self, reason): pass
            def logPrefix(self): return "reader"

        reader = Reader()
        reactor.addReader(reader)
        assert not compat.reactor_renewable(reactor)
        reactor.removeReader(reader)
        assert compat.reactor_renewable(reactor)
        reactor.callLater(0, reactor.stop)
        reactor.run(installSignalHandlers=False)
        assert not compat.reactor_renewable(reactor)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
