"""
What the live progress widget (docs/jobs.md) shares between its tag, views and
event stream: a job's JSON, and the token (signed over the job and user ids)
that lets who could load the page follow or cancel that job.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core import checks, signing

SALT = "twistedlrp.progress"
DEFAULT_MAX_AGE = 6 * 3600
DEFAULT_MAX_STREAMS = 200
EVENTS_PREFIX = "/-/jobs/"


class BadToken(Exception):
    """The token is missing, forged, expired, or for another job or user."""


def max_streams() -> int:
    return int(getattr(settings, "LRP_PROGRESS_MAX_STREAMS", DEFAULT_MAX_STREAMS))


def check_settings(app_configs=None, **kwargs) -> list:
    """@return: a system check's C{checks.Error} for each wrong setting of the widget."""
    errors = []
    age = getattr(settings, "LRP_PROGRESS_TOKEN_MAX_AGE", DEFAULT_MAX_AGE)
    if isinstance(age, bool) or not isinstance(age, int | float) or not 0 < age < float("inf"):
        message = f"LRP_PROGRESS_TOKEN_MAX_AGE must be a number of seconds above 0, not {age!r}"
        errors.append(checks.Error(message, id="twistedlrp.E101"))
    streams = getattr(settings, "LRP_PROGRESS_MAX_STREAMS", DEFAULT_MAX_STREAMS)
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        message = f"LRP_PROGRESS_MAX_STREAMS must be a whole number of at least 1, not {streams!r}"
        errors.append(checks.Error(message, id="twistedlrp.E102"))
    return errors


def user_key(request=None, user=None) -> str | None:
    """@return: the id (as text) of C{request}'s (or C{user}'s) authenticated user, else C{None}."""
    if request is not None:
        user = getattr(request, "user", None)
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return str(user.pk)


def make_token(job_id, user: str | None = None) -> str:
    """@return: a token to follow job C{job_id} for C{user}; @raise ValueError: not a UUID."""
    return signing.dumps({"j": _job_id(job_id), "u": user}, salt=SALT, compress=False)


def check_token(token: str | None, job_id, user: str | None = None, *, check_user=True) -> None:
    """Verify C{token} for C{job_id} (and C{user} if C{check_user}); @raise BadToken: it is not."""
    if not token:
        raise BadToken("no token (the ?token= the page's job widget was given)")
    try:
        max_age = float(getattr(settings, "LRP_PROGRESS_TOKEN_MAX_AGE", DEFAULT_MAX_AGE))
        data = signing.loads(token, salt=SALT, max_age=max_age)
    except signing.SignatureExpired:
        raise BadToken("the token has expired (reload the page)") from None
    except signing.BadSignature:
        raise BadToken("the token is not valid") from None
    try:
        wanted = _job_id(job_id)
    except ValueError:
        raise BadToken("the job id is not a UUID") from None
    if not isinstance(data, dict) or data.get("j") != wanted:
        raise BadToken("the token is for another job")
    if check_user and data.get("u") != user:
        raise BadToken("the token is for another user")


def events_path(job_id, token: str) -> str:
    """@return: the path (with its query) of the job's event stream."""
    return f"{EVENTS_PREFIX}{_job_id(job_id)}/events?token={token}"


def describe(info) -> dict:
    """@return: the job (a L{twistedlrp.jobs.JobInfo} or a dict) as the widget shows it."""
    from twistedlrp.jobs import SUCCEEDED, JobInfo

    if isinstance(info, dict):
        info = JobInfo.from_dict(info)
    current, total, message = info.progress
    return {
        "id": info.id,
        "state": info.state,
        "finished": info.finished,
        "progress": {
            "current": current,
            "total": total,
            "message": message,
            "percent": round(min(100 * current / total, 100), 1) if total else None,
        },
        "result": info.result if info.state == SUCCEEDED else None,
        # The first line says what happened; the traceback is for the admin.
        "error": info.error.splitlines()[0] if info.error else "",
    }


def _job_id(job_id) -> str:
    return str(uuid.UUID(str(job_id)))
