"""
What a submission may ask for, checked where it enters: in the calling
process (L{twistedlrp.jobs.submit}) and again in the job service (whatever
front end it came through), so that a bad value is refused with
L{InvalidArguments} naming the field, and nothing is stored.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime

from twistedlrp.jobs.errors import InvalidArguments

#: The job table's integer column for priorities (a 32-bit integer everywhere).
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
#: Seconds: a limit of over 30 years is a mistake, not a limit.
MAX_SECONDS = 1e9
KEY_LENGTH = 255
#: The default of C{--max-job-payload}: the JSON of a job's arguments, or of its result.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# Unix times that every database's timestamp column (and Python) can hold.
_RUN_AFTER_RANGE = (0.0, datetime(9999, 1, 1, tzinfo=UTC).timestamp())


def check_submission(
    name, priority=None, run_after=None, key=None, timeout=None, job_id=None
) -> dict:
    """
    @return: the values, normalised (C{priority} an int, C{run_after} and
        C{timeout} floats, C{key} a string or C{None}, C{job_id} the
        canonical form of a UUID or C{None}).
    @raise InvalidArguments: a value of the wrong type or out of range; the
        message names the field and the value.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArguments(f"name: expected a job's registered name, got {name!r}")
    return {
        "name": name,
        "priority": check_priority(priority),
        "run_after": check_run_after(run_after),
        "key": check_key(key),
        "timeout": check_seconds("timeout", timeout),
        "job_id": check_job_id(job_id),
    }


def check_priority(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidArguments(f"priority: expected a whole number, got {value!r}")
    low, high = PRIORITY_RANGE
    if not low <= value <= high:
        raise InvalidArguments(f"priority: must be between {low} and {high}, got {value}")
    return value


def _number(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArguments(f"{field}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidArguments(f"{field}: must be a finite number, got {value!r}")
    return number


def check_seconds(field: str, value) -> float | None:
    """A duration: C{None}, or more than 0 and at most L{MAX_SECONDS}."""
    if value is None:
        return None
    seconds = _number(field, value)
    if not 0 < seconds <= MAX_SECONDS:
        raise InvalidArguments(
            f"{field}: must be more than 0 and at most {MAX_SECONDS:g} seconds, got {value!r}"
        )
    return seconds


def check_run_after(value) -> float | None:
    """A Unix time a datetime column can hold (C{None}: now)."""
    if value is None:
        return None
    when = _number("run_after", value)
    low, high = _RUN_AFTER_RANGE
    if not low <= when < high:
        raise InvalidArguments(
            f"run_after: expected a Unix time between 1970 and 9999, got {value!r}"
        )
    return when


def check_key(value) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArguments(f"key: expected a string, got {value!r}")
    if len(value) > KEY_LENGTH:
        raise InvalidArguments(
            f"key: a job key has at most {KEY_LENGTH} characters, this one has {len(value)}"
        )
    return value


def check_job_id(value) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidArguments(f"id: expected a UUID, got {value!r}") from None


def submission_fields(definition, args: list, kwargs: dict, checked: dict) -> dict:
    """
    @param definition: the job's L{twistedlrp.jobs.registry.JobDefinition}.
    @param checked: what L{check_submission} returned.
    @return: the columns of the job a submission stores (without its id),
        the definition's defaults filled in where the submission named none.
    """
    run_after = checked["run_after"]
    return {
        "name": definition.name,
        "args": args,
        "kwargs": kwargs,
        "priority": definition.priority if checked["priority"] is None else checked["priority"],
        "queue": definition.queue,
        "run_after": datetime.fromtimestamp(run_after, UTC) if run_after else None,
        "max_attempts": definition.retries + 1,
        "retry_delay": definition.retry_delay,
        "timeout": definition.timeout if checked["timeout"] is None else checked["timeout"],
        "key": checked["key"],
    }
