"""The job store in the Django admin: browse, filter, search, cancel."""

from django.contrib import admin, messages

from twistedlrp.jobs import states
from twistedlrp.models import Job


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "state",
        "priority",
        "attempts",
        "progress",
        "node",
        "created_at",
        "finished_at",
    )
    list_filter = ("state", "name", "queue", "node")
    search_fields = ("id", "name", "key", "error")
    readonly_fields = [f.name for f in Job._meta.fields]
    actions = ["cancel_jobs"]
    date_hierarchy = "created_at"

    @admin.display(description="progress")
    def progress(self, job):
        if job.progress_total:
            return f"{job.progress_current}/{job.progress_total}"
        return str(job.progress_current or "")

    @admin.action(description="Cancel the selected jobs")
    def cancel_jobs(self, request, queryset):
        # Through the job service, which owns the rows and the workers.
        from twistedlrp import jobs

        done = failed = 0
        for job_id in queryset.filter(state__in=states.UNFINISHED).values_list("id", flat=True):
            try:
                jobs.cancel(job_id)
                done += 1
            except jobs.JobError as e:
                failed += 1
                self.message_user(request, f"{job_id}: {e}", messages.ERROR)
        self.message_user(request, f"Cancellation requested for {done} job(s).")

    def has_add_permission(self, request):
        return False
