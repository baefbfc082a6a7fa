"""What a client may ask for, checked by the caller and again by the service; job ids canonical."""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from datetime import UTC, datetime

from twistedlrp.jobs.errors import InvalidArguments, PayloadTooLarge, UnknownJob
from twistedlrp.jobs.states import ALL as STATES

#: The job table's integer column for priorities (a 32-bit integer everywhere).
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
#: Seconds: a limit of over 30 years is a mistake, not a limit.
MAX_SECONDS = 1e9
KEY_LENGTH = 255
#: The longest job name (the job table's column): a longer one cannot be registered.
NAME_LENGTH = 255
MAX_WAIT_TIMEOUT = 3600.0
MAX_LIST_LIMIT = 1000
#: The longest C{seen} mark of a C{Wait} (L{wire.seen_mark} makes 32 characters).
SEEN_LENGTH = 64
#: A job id is read from at most this many characters (a UUID takes 36 to 45).
_JOB_ID_LENGTH = 64
# Unix times that every database's timestamp column (and Python) can hold.
_RUN_AFTER_RANGE = (0.0, datetime(9999, 1, 1, tzinfo=UTC).timestamp())


def check_submission(
    name, priority=None, run_after=None, key=None, timeout=None, job_id=None
) -> dict:
    """@return: the values, normalised. @raise InvalidArguments: one of the wrong type or range."""
    if not isinstance(name, str) or not name:
        raise InvalidArguments(f"name: expected a job's registered name, got {shown(name)}")
    if len(name) > NAME_LENGTH:
        raise InvalidArguments(
            f"name: a job name has at most {NAME_LENGTH} characters, this one has {len(name)}"
        )
    return {
        "name": name,
        "priority": check_priority(priority),
        "run_after": check_run_after(run_after),
        "key": check_key(key),
        "timeout": check_seconds("timeout", timeout),
        "job_id": check_job_id(job_id),
    }


def check_submitted(kw: dict) -> dict:
    """@return: L{check_submission} of a submission as the client has it (C{id} is its job id)."""
    fields = ("priority", "run_after", "key", "timeout", "id")
    return check_submission(kw["name"], *(kw.get(field) for field in fields))


def default_max_payload() -> int:
    """@return: the option table's default of C{--max-job-payload} (imported when needed)."""
    from twistedlrp.options import OPTIONS

    return next(o.default_value() for o in OPTIONS if o.name == "max-job-payload")


def check_priority(value):
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArguments(f"priority: expected a whole number, got {shown(value)}")
    low, high = PRIORITY_RANGE
    if not low <= value <= high:
        raise InvalidArguments(f"priority: must be between {low} and {high}, got {shown(value)}")
    return value


def _number(field: str, value, fits, expected: str) -> float:
    """@return: C{value}, a finite number that C{fits}, as a float. @raise InvalidArguments."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArguments(f"{field}: expected a number, got {shown(value)}")
    number = math.inf
    with contextlib.suppress(OverflowError):
        number = float(value)
    if not math.isfinite(number):
        raise InvalidArguments(f"{field}: must be a finite number, got {shown(value)}")
    if not fits(number):
        raise InvalidArguments(f"{field}: {expected}, got {shown(value)}")
    return number


def check_seconds(field: str, value) -> float | None:
    """A duration: C{None}, or more than 0 and at most L{MAX_SECONDS}."""
    if value is None:
        return None
    expected = f"must be more than 0 and at most {MAX_SECONDS:g} seconds"
    return _number(field, value, lambda seconds: 0 < seconds <= MAX_SECONDS, expected)


def check_run_after(value) -> float | None:
    """A Unix time a datetime column can hold (C{None}: now)."""
    if value is None:
        return None
    low, high = _RUN_AFTER_RANGE
    expected = "expected a Unix time between 1970 and 9999"
    return _number("run_after", value, lambda when: low <= when < high, expected)


def check_key(value) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArguments(f"key: expected a string, got {shown(value)}")
    if len(value) > KEY_LENGTH:
        raise InvalidArguments(
            f"key: a job key has at most {KEY_LENGTH} characters, this one has {len(value)}"
        )
    return value


def check_job_id(value) -> str | None:
    """The C{id} a submission chose: C{None}, or a UUID in its canonical form."""
    if value is None:
        return None
    job_id = _as_uuid(value)
    if job_id is None:
        raise InvalidArguments(f"id: expected a UUID, got {shown(value)}")
    return job_id


def canonical_job_id(value) -> str:
    """
    @return: the job id C{value} (a string or a C{uuid.UUID}) in its canonical form.
    @raise UnknownJob: a string but not a UUID. @raise InvalidArguments: not a string.
    """
    if not isinstance(value, str | uuid.UUID):
        raise InvalidArguments(f"job_id: expected a job id (a UUID), got {shown(value)}")
    job_id = _as_uuid(value)
    if job_id is None:
        raise UnknownJob(f"no job has the id {shown(value)} (a job id is a UUID)")
    return job_id


def _as_uuid(value) -> str | None:
    """@return: C{value} in the canonical form of a UUID (lower-case, hyphenated), or C{None}."""
    if isinstance(value, str) and len(value) <= _JOB_ID_LENGTH:
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(value))
    return str(value) if isinstance(value, uuid.UUID) else None


def check_duration(field: str, value) -> float:
    """A finite number of seconds, 0 or more."""
    return _number(field, value, lambda seconds: seconds >= 0, "must be 0 or more seconds")


def check_wait_timeout(value) -> float:
    """The C{timeout} of a C{Wait}: 0 to L{MAX_WAIT_TIMEOUT} seconds."""
    expected = f"a Wait waits from 0 to {MAX_WAIT_TIMEOUT:g} seconds"
    return _number("timeout", value, lambda seconds: 0 <= seconds <= MAX_WAIT_TIMEOUT, expected)


def check_seen(value) -> str | None:
    """The C{seen} mark of a C{Wait}: C{None} or a short string."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > SEEN_LENGTH:
        raise InvalidArguments(
            f"seen: expected the mark of a job (at most {SEEN_LENGTH} characters), "
            f"got {shown(value)}"
        )
    return value


def check_listing(state=None, name=None, limit=100) -> dict:
    """@return: a C{ListJobs}'s filters (C{None}: none) and limit. @raise InvalidArguments."""
    if state in (None, ""):
        state = None
    elif state not in STATES:
        raise InvalidArguments(
            f"state: expected one of {', '.join(STATES)} (or none), got {shown(state)}"
        )
    if name in (None, ""):
        name = None
    elif not isinstance(name, str) or len(name) > NAME_LENGTH:
        raise InvalidArguments(f"name: expected a job name, got {shown(name)}")
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArguments(
            f"limit: expected a whole number from 0 to {MAX_LIST_LIMIT}, got {shown(limit)}"
        )
    return {"state": state, "name": name, "limit": limit}


def shown(value, length: int = 80) -> str:
    """@return: C{repr(value)}, cut to about C{length} characters (for messages)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= length else f"{text[:length]}... ({len(text)} characters)"


def shown_error(error: Exception, length: int = 200) -> str:
    """@return: what C{error} says, cut to about C{length} characters."""
    text = str(error) or type(error).__name__
    return text if len(text) <= length else text[:length] + "..."


def submission_fields(definition, args: list, kwargs: dict, checked: dict) -> dict:
    """@return: the columns a submission stores (not its id), with C{definition}'s defaults."""
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


def check_payload(
    name: str, payload, limit: int, whose: str = "the job service's limit"
) -> tuple[list, dict]:
    """@return: a JSON payload's C{args} and C{kwargs}. @raise InvalidArguments, PayloadTooLarge."""
    if not isinstance(payload, bytes):
        raise InvalidArguments(f"the payload of {name} must be JSON bytes")
    if len(payload) > limit:
        raise PayloadTooLarge(
            f"the arguments of {name} take {len(payload)} bytes of JSON, more than {whose} "
            f"of {limit} bytes (--max-job-payload)"
        )
    try:
        # NaN and Infinity are not JSON (and PostgreSQL's jsonb refuses them).
        data = _DECODER.decode(payload.decode("utf-8"))
        args, kwargs = data["args"], data["kwargs"]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("args must be a list and kwargs an object")
    except RecursionError:
        raise InvalidArguments(
            f"the payload of {name} is not valid job arguments: JSON nested too deeply"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArguments(f"the payload of {name} is not valid job arguments: {e}") from None
    return args, kwargs


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


# json.loads with an option builds a decoder a call.
_DECODER = json.JSONDecoder(parse_constant=_not_json)
