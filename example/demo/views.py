import uuid

from django.http import Http404, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from demo.jobs import import_contacts
from demo.lrp import BOOT
from demo.models import Contact
from twistedlrp import jobs
from twistedlrp.progress import describe

IMPORT_COUNT = 5000


def home(request):
    job_id = request.GET.get("job", "")
    try:
        job_id = str(uuid.UUID(job_id)) if job_id else ""
    except ValueError:
        job_id = ""
    job = None
    if job_id:
        try:
            job = jobs.get(job_id)
        except jobs.JobError:
            job = job_id  # the progress widget says what is wrong
    return render(
        request,
        "demo/home.html",
        {
            "primes": BOOT.get("primes", []),
            "boot": BOOT,
            "contacts": Contact.objects.count(),
            "import_count": f"{IMPORT_COUNT:,}",
            # Set after a submission (see start_import): the page follows that job.
            "job": job,
            "result": job.result
            if isinstance(job, jobs.JobInfo) and job.state == jobs.SUCCEEDED
            else None,
        },
    )


@require_POST
def start_import(request):
    """
    Submit the import job and answer at once: a redirect to the home page,
    whose progress widget follows the job (JSON for a client that asks).
    """
    try:
        info = import_contacts.submit(IMPORT_COUNT)
    except jobs.JobError as e:
        return _refused(e)
    if _wants_json(request):
        return JsonResponse(_describe(info), status=202)
    return HttpResponseRedirect(f"/?job={info.id}", status=303)


@require_GET
def job_status(request, job_id):
    """The job's state and progress, polled by the page's script."""
    try:
        info = jobs.get(job_id)
    except jobs.UnknownJob:
        raise Http404("no such job") from None
    except jobs.JobError as e:
        return _refused(e)
    return JsonResponse(_describe(info))


@require_POST
def cancel_job(request, job_id):
    try:
        info = jobs.cancel(job_id)
    except jobs.UnknownJob:
        raise Http404("no such job") from None
    except jobs.JobError as e:
        return _refused(e)
    if _wants_json(request):
        return JsonResponse(_describe(info))
    return HttpResponseRedirect(f"/?job={info.id}", status=303)


def _describe(info: jobs.JobInfo) -> dict:
    # The progress widget's view of a job: state, progress, result, error.
    return describe(info)


def _wants_json(request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _refused(error: Exception) -> JsonResponse:
    status = 503 if isinstance(error, jobs.JobServiceUnavailable) else 400
    return JsonResponse({"error": str(error)}, status=status)
