"""
The states of a job: C{queued}, then C{running}, then C{succeeded}, C{failed} or
C{cancelled}; a failed attempt with retries left goes back to C{queued}.
"""

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
#: States a job never leaves.
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
#: States a job is still in the job service's hands.
UNFINISHED = (QUEUED, RUNNING)
#: For the model's C{state} field.
CHOICES = [(state, state) for state in ALL]
