"""Jobs a site's own transaction stored on SQLite, announced for the job service to take."""

from __future__ import annotations

import contextlib
import uuid

from twistedlrp.jobs.states import QUEUED
from twistedlrp.jobs.store.operations import payload_of

#: The most announced jobs one take reads (the next take reads the rest).
TAKE_ANNOUNCED = 500
_TAKEN = (
    "id", "priority", "created_at", "run_after", "queue", "name", "max_attempts", "retry_delay",
    "timeout", "args", "kwargs",
)  # fmt: skip


def announced() -> bool:
    """@return: whether any job waits in the announcement table (read outside a transaction)."""
    from twistedlrp.models import Announcement

    return Announcement.objects.exists()


def take_announced(job_ids: list[str] | None = None) -> list[dict]:
    """@return: the queued jobs among C{job_ids} (C{None}: any), taken out, oldest first."""
    from twistedlrp.models import Announcement, Job

    notices = Announcement.objects.all()
    if job_ids is not None:
        valid = []
        for job_id in job_ids:
            with contextlib.suppress(ValueError):
                valid.append(uuid.UUID(str(job_id)))
        notices = notices.filter(job__in=valid)
    taken = list(notices.values_list("job", flat=True)[:TAKE_ANNOUNCED])
    Announcement.objects.filter(job__in=taken).delete()
    queued = Job.objects.filter(id__in=taken, state=QUEUED).order_by("created_at")
    rows = list(queued.values(*_TAKEN))
    for row in rows:
        row.update(id=str(row["id"]), payload=payload_of(row.pop("args"), row.pop("kwargs")))
    return rows
