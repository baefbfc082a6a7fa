"""The job service's exceptions (public through L{twistedlrp.jobs})."""


class JobError(Exception):
    """Base class of the job service's errors."""


class JobServiceUnavailable(JobError):
    """The job service could not be reached, or cannot take work now."""


class UnknownJob(JobError, LookupError):
    """No job has this id."""


class NotRegistered(JobError, LookupError):
    """No job function is registered under this name; nothing was stored."""


class InvalidArguments(JobError, TypeError):
    """The arguments cannot be encoded as JSON; nothing was stored."""


class PayloadTooLarge(JobError, ValueError):
    """The arguments (or a result) exceed the job service's payload limit."""


class AuthenticationFailed(JobError):
    """The job service refused the shared secret, or a command came before Login."""


class JobCancelled(JobError):
    """Raised inside a job (by the job itself) to stop after L{cancelled} said so."""


def unsure(message: str, op: str, job_id: str | None = None) -> JobServiceUnavailable:
    """@return: the error of C{op} that failed with C{message}, saying what to do if it may have taken effect."""
    if op == "submit":
        again = f"id={job_id}" if job_id else "the same id (or key)"
        message += (
            f"; the job may or may not have been stored: submit again with {again} to get the "
            f"same job instead of a second one"
        )
    elif op == "cancel":
        message += "; the cancellation may or may not have been requested: cancel again"
    return JobServiceUnavailable(message)
