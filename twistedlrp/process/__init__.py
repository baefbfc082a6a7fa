"""
The one way twistedlrp runs a child process (the reload supervisor's
server, the web processes, the job workers): one control channel, one
description of an exit, one warm fork server, one restart and stop policy.
"""
