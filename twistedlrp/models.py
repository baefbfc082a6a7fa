"""
The durable job store: one row per job, written only by the job service;
views read jobs through L{twistedlrp.jobs.get}, which sees live progress too.
"""

import uuid

from django.db import models

from twistedlrp.jobs import states


class Job(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, db_index=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=16, choices=states.CHOICES, default=states.QUEUED)
    priority = models.IntegerField(default=0, help_text="Higher runs first.")
    queue = models.CharField(max_length=100, default="default")
    run_after = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=1)
    retry_delay = models.FloatField(default=0, help_text="Seconds before the first retry.")
    timeout = models.FloatField(null=True, blank=True, help_text="Seconds per attempt.")
    progress_current = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(null=True, blank=True)
    progress_message = models.TextField(blank=True, default="")
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="", help_text="Error message and traceback.")
    worker = models.CharField(max_length=100, blank=True, default="")
    # A database default too: rows written by an older version or by hand have one.
    node = models.CharField(
        max_length=255,
        blank=True,
        default="",
        db_default="",
        help_text="The job node of the last attempt.",
    )
    output = models.TextField(blank=True, default="", help_text="Tail of stdout and stderr.")
    cancel_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    key = models.CharField(max_length=255, null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # The claim query: queued jobs by priority, then age.
            models.Index(
                fields=["state", "queue", "-priority", "created_at"], name="lrp_job_claim"
            ),
            models.Index(fields=["state", "run_after"], name="lrp_job_delayed"),
            # Each node's running jobs (its recovery, the leases of dead nodes).
            models.Index(fields=["state", "node"], name="lrp_job_node"),
        ]
        constraints = [
            # At most one unfinished job per key.
            models.UniqueConstraint(
                fields=["key"],
                condition=models.Q(state__in=list(states.UNFINISHED)),
                name="lrp_job_unique_active_key",
            )
        ]

    def __str__(self):
        return f"{self.name} {self.id} ({self.state})"


class Node(models.Model):
    """A job node: the others retry or fail the running jobs of a node whose heartbeat stopped."""

    name = models.CharField(max_length=255, primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.IntegerField()
    queues = models.TextField(blank=True, default="", help_text="Comma-separated; empty: all.")
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({self.host}, pid {self.pid})"


class Schedule(models.Model):
    """
    A periodic job (C{@job(schedule=...)} or C{LRP_SCHEDULE}), synced at each job node's
    start; the node that moves C{next_due} on (a conditional update) submits the job.
    """

    name = models.CharField(max_length=255, primary_key=True)
    job = models.CharField(max_length=255, help_text="The registered job name.")
    cron = models.CharField(
        max_length=255, help_text="Cron expression (5 fields, or 6 with seconds first)."
    )
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    next_due = models.DateTimeField(db_index=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_job = models.UUIDField(null=True, blank=True, help_text="The job of the last run.")

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({self.cron})"


class Announcement(models.Model):
    """
    A job submitted inside C{transaction.atomic()} on SQLite, not yet queued: the
    service sweeps this table, in case its process died between commit and word.
    """

    job = models.UUIDField(primary_key=True)

    def __str__(self):
        return str(self.job)
