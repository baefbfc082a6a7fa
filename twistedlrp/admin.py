"""
The jobs and schedules in the Django admin, read-only (the job service owns
the rows); jobs can be cancelled, run again, or deleted once finished.
"""

from datetime import UTC, datetime

from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.urls import reverse
from django.utils.dateformat import format as date_format
from django.utils.html import format_html
from django.utils.timezone import localtime

from twistedlrp import jobs
from twistedlrp.jobs import states
from twistedlrp.models import Job, Schedule

# Django's DATETIME_FORMAT shows no seconds; jobs last seconds.
TIME_FORMAT = "Y-m-d H:i:s"


def seconds(value) -> str:
    """@return: an aware datetime as C{2026-12-01 10:20:03} in the current time zone, or ""."""
    return date_format(localtime(value), TIME_FORMAT) if value else ""


def duration_text(total: float) -> str:
    """@return: C{"2.35 s"} under a minute, else C{"1:02:03"} (hours, minutes, seconds)."""
    if total < 60:
        return f"{total:.2f} s"
    whole = int(total)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _timed(field: str, description: str):
    @admin.display(description=description, ordering=field)
    def show(self, obj):
        return seconds(getattr(obj, field))

    return show


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows only the job service writes: viewable, never edited here (no Save buttons)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ("name", "state", "priority", "attempts", "progress", "node", "created")
    list_display += ("duration", "finished")
    list_filter = ("state", "name", "queue", "node")
    search_fields = ("id", "name", "key", "error")
    # The change page: every field, its times to the second.
    fields = [
        {"created_at": "created", "started_at": "started", "finished_at": "finished"}.get(
            f.name, "run_after_time" if f.name == "run_after" else f.name
        )
        for f in Job._meta.fields
    ]
    fields.insert(fields.index("finished") + 1, "duration")
    readonly_fields = fields
    actions = ["cancel_jobs", "run_again", "delete_selected"]
    date_hierarchy = "created_at"

    created = _timed("created_at", "created")
    started = _timed("started_at", "started")
    finished = _timed("finished_at", "finished")
    run_after_time = _timed("run_after", "run after")

    @admin.display(description="progress")
    def progress(self, job):
        if job.progress_total:
            return f"{job.progress_current}/{job.progress_total}"
        return str(job.progress_current or "")

    @admin.display(description="duration")
    def duration(self, job):
        if job.started_at is None:
            return ""
        if job.state == states.RUNNING:
            return duration_text((datetime.now(UTC) - job.started_at).total_seconds()) + " so far"
        if job.finished_at is None or job.finished_at < job.started_at:
            return ""
        return duration_text((job.finished_at - job.started_at).total_seconds())

    def has_cancel_permission(self, request):
        # Cancelling or running again is a change, though the change page is read-only.
        return request.user.has_perm("twistedlrp.change_job")

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.state in states.UNFINISHED:
            return False
        return super().has_delete_permission(request, obj)

    @admin.action(description="Cancel the selected jobs", permissions=["cancel"])
    def cancel_jobs(self, request, queryset):
        # Through the job service, which owns the rows and the workers.
        done = 0
        for job_id in queryset.filter(state__in=states.UNFINISHED).values_list("id", flat=True):
            try:
                jobs.cancel(job_id)
                done += 1
            except jobs.JobError as e:
                self.message_user(request, f"{job_id}: {e}", messages.ERROR)
        self.message_user(request, f"Cancellation requested for {done} job(s).")

    @admin.action(description="Run the selected jobs again", permissions=["cancel"])
    def run_again(self, request, queryset):
        submitted = []
        for job in queryset.order_by("created_at"):
            try:
                submitted.append(jobs.submit(job.name, job.args, job.kwargs).id)
            except jobs.JobError as e:
                self.message_user(request, f"{job.id} ({job.name}): {e}", messages.ERROR)
        if submitted:
            self.message_user(
                request, f"Submitted {len(submitted)} new job(s): {', '.join(submitted)}."
            )

    @admin.action(description="Delete the selected finished jobs", permissions=["delete"])
    def delete_selected(self, request, queryset):
        """Django's delete, refused while a job is unfinished."""
        unfinished = queryset.filter(state__in=states.UNFINISHED).count()
        if unfinished:
            self.message_user(
                request,
                f"Nothing was deleted: {unfinished} of the selected jobs are queued or "
                "running; cancel them first.",
                messages.ERROR,
            )
            return None
        return django_delete_selected(self, request, queryset)


@admin.register(Schedule)
class ScheduleAdmin(ReadOnlyAdmin):
    """The table is synced from the code and LRP_SCHEDULE at each job node's start."""

    list_display = ("name", "job", "cron", "last_run", "next_run", "last_job_link")
    search_fields = ("name", "job")
    fields = ["name", "job", "cron", "args", "kwargs", "next_run", "last_run", "last_job_link"]
    readonly_fields = fields

    last_run = _timed("last_run_at", "last run")
    next_run = _timed("next_due", "next run")

    @admin.display(description="last job")
    def last_job_link(self, schedule):
        if schedule.last_job is None:
            return ""
        url = reverse("admin:twistedlrp_job_change", args=[schedule.last_job])
        return format_html('<a href="{}">{}</a>', url, schedule.last_job)

    def has_delete_permission(self, request, obj=None):
        # A deleted schedule would come back at the next start: change the code instead.
        return False
