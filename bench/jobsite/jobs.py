"""The no-op job twistedlrp's workers run (the server and every worker import this module)."""

from twistedlrp.jobs import job


@job
def noop(i):
    return i
