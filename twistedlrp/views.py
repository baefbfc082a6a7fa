"""
The views behind the live progress widget (docs/jobs.md, "Showing
progress"): the job's state as JSON, which the widget polls when
Server-Sent Events are not available, and its cancel button. Both need the
signed token the page's C{{% lrp_job_progress %}} gave (L{twistedlrp.progress}),
made for the same job and the same user; without it they answer 403.
Include them with C{path("lrp/", include("twistedlrp.urls"))}.
"""

from __future__ import annotations

from django.http import HttpResponseRedirect, JsonResponse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from twistedlrp import jobs
from twistedlrp.progress import BadToken, check_token, describe, user_key


@require_GET
def job_status(request, job_id):
    """
    @return: the job as the widget shows it (JSON; see
        L{twistedlrp.progress.describe}); 403 for a bad token, 404 for an
        unknown job, 503 when the job service cannot be reached.
    """
    refused = _refused_token(request, request.GET.get("token"), job_id)
    if refused is not None:
        return refused
    try:
        info = jobs.get(job_id)
    except jobs.JobError as e:
        return _job_error(e)
    return _json(describe(info))


@require_POST
def cancel_job(request, job_id):
    """
    Cancel the job (the form's C{token} must be the widget's).

    @return: the job after the request as JSON when the client accepts
        JSON (the widget's script), else a redirect to the form's C{next}
        (the page it was on), or the job as JSON without one; 403 for a bad
        token, 404 for an unknown job, 503 when the service is unreachable.
    """
    refused = _refused_token(request, request.POST.get("token"), job_id)
    if refused is not None:
        return refused
    try:
        info = jobs.cancel(job_id)
    except jobs.JobError as e:
        return _job_error(e)
    target = request.POST.get("next", "")
    wants_json = "application/json" in request.headers.get("Accept", "")
    if target and not wants_json and _safe(request, target):
        return HttpResponseRedirect(target, status=303)
    return _json(describe(info))


def _refused_token(request, token, job_id) -> JsonResponse | None:
    try:
        check_token(token, job_id, user_key(request))
    except BadToken as e:
        return _json({"error": str(e)}, status=403)
    return None


def _job_error(error: jobs.JobError) -> JsonResponse:
    if isinstance(error, jobs.UnknownJob):
        status = 404
    elif isinstance(error, jobs.JobServiceUnavailable):
        status = 503
    else:
        status = 400
    return _json({"error": str(error)}, status=status)


def _json(data: dict, status: int = 200) -> JsonResponse:
    response = JsonResponse(data, status=status)
    # A job's state changes: no cache may answer for the service.
    response["Cache-Control"] = "no-store"
    return response


def _safe(request, target: str) -> bool:
    return url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
