"""The ways to call the job service: the call from any thread, its clients (in-process, AMP, blocking) and submissions inside a transaction."""
