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
