"""C{{% lrp_job_progress job %}}: a job's progress bar and cancel form (docs/jobs.md)."""

from __future__ import annotations

from django import template
from django.core.exceptions import ImproperlyConfigured
from django.urls import NoReverseMatch, reverse

from twistedlrp import jobs
from twistedlrp.progress import describe, events_path, make_token, user_key

register = template.Library()


@register.inclusion_tag("twistedlrp/job_progress.html", takes_context=True)
def lrp_job_progress(context, job, cancel=True):
    """
    @param job: a L{twistedlrp.jobs.JobInfo}, or a job id (read now).
    @return: the template's context (a problem, if the job cannot be read).
    @raise ImproperlyConfigured: the site does not include C{twistedlrp.urls}.
    """
    problem = ""
    if isinstance(job, jobs.JobInfo):
        shown = describe(job)
    else:
        try:
            shown = describe(jobs.get(job))
        except jobs.UnknownJob:
            shown, problem = None, "no such job"
        except jobs.JobError as e:
            shown, problem = None, f"the job service cannot be reached ({e})"
    if shown is None:
        return {"job": None, "problem": problem}
    request = context.get("request")
    # Without the request context processor, the auth one's user will do.
    token = make_token(shown["id"], user_key(request, context.get("user")))
    try:
        status_url = reverse("twistedlrp:job-status", args=[shown["id"]])
        cancel_url = reverse("twistedlrp:job-cancel", args=[shown["id"]])
    except NoReverseMatch:
        raise ImproperlyConfigured(
            "{% lrp_job_progress %} needs the URLs of twistedlrp.views: add "
            'path("lrp/", include("twistedlrp.urls")) to the URLconf'
        ) from None
    progress = shown["progress"]
    return {
        "job": shown,
        "problem": problem,
        "percent": progress["percent"],
        "total": progress["total"],
        "current": min(progress["current"], progress["total"] or progress["current"]),
        "token": token,
        "events_url": events_path(shown["id"], token),
        "status_url": f"{status_url}?token={token}",
        "cancel_url": cancel_url,
        "cancel": cancel,
        "next": request.get_full_path() if request is not None else "",
    }
