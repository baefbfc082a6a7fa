"""
``python -m twistedlrp.onefile ARGS``: ``twistd --nodaemon --pidfile= lrp ARGS``,
what L{twistedlrp.onefile.runner.serve} replaces ``python hello.py`` with.
"""

import sys

from twisted.scripts.twistd import run

sys.argv = ["twistd", "--nodaemon", "--pidfile=", "lrp", *sys.argv[1:]]
run()
