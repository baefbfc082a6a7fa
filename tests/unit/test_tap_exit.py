"""
twistedlrp.signals.end_at_exit (armed by makeService): after a clean stop
(the reactor's "after shutdown") a twistd process ends at exit without the
interpreter's finalisation, after every later exit handler, its output
flushed and its exit status kept; any other way out is Python's own.
"""

import subprocess
import sys

import pytest

# A process that arms the exit the way makeService does, with a stand-in
# reactor whose "after shutdown" trigger the script fires (or not); an object
# whose finaliser writes a line shows whether the interpreter finalised.
SCRIPT = """
import atexit, os, sys
from twistedlrp import signals

class Reactor:
    def addSystemEventTrigger(self, phase, event, f, *args):
        assert (phase, event) == ("after", "shutdown")
        self.stopped = lambda: f(*args)

class Finalised:
    def __del__(self):
        os.write(1, b"finalised\\n")

reactor = Reactor()
signals.end_at_exit(reactor)
atexit.register(os.write, 1, b"a later exit handler ran\\n")
keep = Finalised()
sys.stdout.write("buffered line\\n")  # flushed at exit either way
how = sys.argv[1]
if how not in ("no stop", "status 1 without a stop"):
    reactor.stopped()
if "status 1" in how:
    signals.set_exit_code(1)
if how == "exception":
    raise RuntimeError("after the stop")
"""


@pytest.mark.parametrize(
    "how, code, finalised",
    [
        ("clean stop", 0, False),
        ("stop with status 1", 1, False),
        ("no stop", 0, True),
        ("status 1 without a stop", 1, False),
        ("exception", 1, True),
    ],
)
def test_the_exit_after_a_clean_stop_skips_finalisation_only(how, code, finalised):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == code, result.stderr
    assert "buffered line\n" in result.stdout
    assert ("finalised\n" in result.stdout) is finalised, result.stdout
    assert "a later exit handler ran\n" in result.stdout, result.stdout
