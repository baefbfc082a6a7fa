"""
The one way twistedlrp runs a child process, used by the reload supervisor
(L{twistedlrp.reload}), the web processes of C{--web-workers}
(L{twistedlrp.web.processes}) and the job workers
(L{twistedlrp.jobs.workers.pool}): one control channel (L{channel}), one
description of how a process ended (L{exits}), one warm fork server
(L{forkserver}) and one restart and stop policy (L{supervise}).
"""
