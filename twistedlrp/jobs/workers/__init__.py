"""The worker processes: the pool, one worker as the service sees it, the worker template, and the worker process's own side."""
