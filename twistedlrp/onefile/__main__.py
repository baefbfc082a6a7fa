"""``python -m twistedlrp.onefile ARGS``: ``twistd --nodaemon --pidfile= lrp ARGS``."""

import sys

from twisted.scripts.twistd import run

sys.argv = ["twistd", "--nodaemon", "--pidfile=", "lrp", *sys.argv[1:]]
run()
