"""The progress widget's views: a job's state and its cancel; without the token, 403."""

from __future__ import annotations

from django.http import HttpResponseRedirect, JsonResponse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from twistedlrp import jobs
from twistedlrp.progress import BadToken, check_token, describe, user_key


@require_GET
def job_status(request, job_id):
    """@return: the job as JSON (L{twistedlrp.progress.describe}), or an error (L{_call})."""
    return _call(request, request.GET.get("token"), job_id, jobs.get)


@require_POST
def cancel_job(request, job_id):
    """@return: after the cancel, a redirect to the form's C{next}, or (JSON) as L{job_status}."""
    response = _call(request, request.POST.get("token"), job_id, jobs.cancel)
    target = request.POST.get("next", "")
    wants_json = "application/json" in request.headers.get("Accept", "")
    if response.status_code == 200 and target and not wants_json:
        hosts, https = {request.get_host()}, request.is_secure()
        if url_has_allowed_host_and_scheme(target, allowed_hosts=hosts, require_https=https):
            return HttpResponseRedirect(target, status=303)
    return response


def _call(request, token, job_id, operation) -> JsonResponse:
    """@return: the job after C{operation(job_id)} as JSON, or the error (403, 404, 503, 400)."""
    try:
        check_token(token, job_id, user_key(request))
        return _json(describe(operation(job_id)))
    except BadToken as e:
        return _json({"error": str(e)}, status=403)
    except jobs.UnknownJob as e:
        return _json({"error": str(e)}, status=404)
    except jobs.JobServiceUnavailable as e:
        return _json({"error": str(e)}, status=503)
    except jobs.JobError as e:
        return _json({"error": str(e)}, status=400)


def _json(data: dict, status: int = 200) -> JsonResponse:
    response = JsonResponse(data, status=status)
    # A job's state changes: no cache may answer for the service.
    response["Cache-Control"] = "no-store"
    return response
