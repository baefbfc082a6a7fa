"""
Development reload: ``twistd lrp --reload``.

The C{twistd} process becomes a lean supervisor
(L{twistedlrp.reload.supervisor}) that never imports Django or the site. It
binds the listening sockets once, runs the real server as a child process
(L{twistedlrp.reload.server_main}) that adopts them, watches the source files
(L{twistedlrp.reload.watcher}) and replaces the child when one changes.
"""
