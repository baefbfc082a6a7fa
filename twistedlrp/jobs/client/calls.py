"""
A job call from any thread (L{call}), behind the public API: to a reactor's client
(L{connection}), from the calling thread (L{blocking}), or eager (L{twistedlrp.jobs.eager}).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp import reactor_bridge
from twistedlrp.backoff import Backoff
from twistedlrp.jobs.client import transactions
from twistedlrp.jobs.errors import InvalidArguments, JobServiceUnavailable, PayloadTooLarge, unsure
from twistedlrp.jobs.protocol import framing, wire
from twistedlrp.jobs.protocol.arguments import check_submitted

if TYPE_CHECKING:
    from twistedlrp.jobs.client.connection import JobClient

log = Logger()

DEFAULT_TIMEOUT = 10.0
# The share of a call's time a job node may wait for a store it cannot reach before
# it refuses a submission: the rest is for the answer, and for asking the next node.
STORE_WAIT_SHARE = 0.8
NO_SOCKET = (
    "its socket does not exist (is the server running, with this --state-dir or LRP_STATE_DIR?)"
)
TRIES_PER_NODE = 2  # a call tries one node at most this many times
UP, DOWN, CONNECTING = "up", "down", "connecting"
_client: JobClient | None = None  # the process-wide client
_slots: CallSlots | None = None


def unreachable(endpoint, error: str | None = None, detail: str = "") -> str:
    """@return: the message of a job service that cannot be reached (because of C{error})."""
    because = f": {error}" if error else ""
    return f"the job service at {endpoint} could not be reached{detail}{because}"


def broke_during(endpoint, op: str, reason) -> str:
    return f"the connection to the job service at {endpoint} broke during {op}: {reason}"


def no_answer(endpoint, op: str, seconds: float, job_id: str | None = None):
    """@return: the error of an operation the job service did not answer in time."""
    return unsure(
        f"the job service at {endpoint} did not answer {op} within {seconds:g} s", op, job_id
    )


class Node:
    """
    One job node of a client: C{state} (C{CONNECTING} until its first attempt ends)
    since C{since}, the last error, and C{retry_at}, the end of its back-off.
    """

    def __init__(self, endpoint: str, secret: bytes | None, clock):
        self.endpoint, self.secret, self.clock = endpoint, secret, clock
        self.backoff = Backoff(0.05, 5.0, jitter=0.1)  # reconnections: a blink to a few seconds
        self.state, self.since, self.retry_at = CONNECTING, clock(), 0.0
        self.last_error: str | None = None
        self.refused = False  # it refused our secret: calls say so, not "unavailable"

    def up(self) -> None:
        self.last_error, self.refused, self.retry_at = None, False, 0.0
        self.backoff.reset()
        self.set_state(UP)

    def down(self, reason: str, refused: bool = False, lost: bool = False) -> float:
        """@return: seconds until it is tried again (at once after a lost connection)."""
        self.last_error, self.refused = reason, refused
        delay = 0.0 if lost else self.backoff.next()
        self.retry_at = self.clock() + delay
        self.set_state(DOWN)
        return delay

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state, self.since = state, self.clock()

    def problem(self) -> str:
        """@return: why calls to this node fail now."""
        return unreachable(self.endpoint, self.last_error)


class Attempts:
    """
    One call's tries over the job nodes: a request whose connection broke is sent again
    unless it is a submission without an id; a node that answers C{UNAVAILABLE}, replaced.
    """

    def __init__(self, op: str, kw: dict, limit: float, now: float):
        self.op, self.kw, self.limit = op, kw, limit
        self.started, self.deadline = now, now + limit
        self.repeatable = op != "submit" or bool(kw.get("id"))
        self.tries: dict = {}
        self.problems: list[str] = []
        self.unknown = False  # may an earlier send have taken effect?
        self._sends = 0

    def arguments(self, now: float) -> dict:
        """@return: the AMP arguments of the next send. @raise InvalidArguments: a bad submission."""
        sent = self.kw
        self._sends += 1
        if self.op == "wait" and self._sends > 1:
            # Sent again: wait until the first one would have stopped.
            sent = dict(sent, timeout=max(0.0, float(sent["timeout"]) - (now - self.started)))
        if self.op == "submit":
            checked = check_submitted(sent)
            wait = round(max(self.deadline - now, 0.0) * STORE_WAIT_SHARE, 3)
            sent = dict(sent, id=checked.pop("job_id"), wait=wait, **checked)
        return wire.OPERATIONS[self.op].arguments(sent, encoded=True)

    def broke(self, message: str) -> None:
        """The connection broke after the request was sent. @raise JobServiceUnavailable: not again."""
        if not self.repeatable:
            raise unsure(message, self.op)
        self.problems.append(message)
        self.unknown = True

    def refused(self, node, error: JobServiceUnavailable, nodes: int) -> None:
        """C{node} answered C{error}. @raise JobServiceUnavailable: C{error}, if no other node may be asked."""
        if not self.repeatable or nodes == 1:
            raise error
        self.problems.append(f"the job service at {node.endpoint} answered: {error}")
        self.tries[node] = TRIES_PER_NODE
        self.unknown = self.unknown or "may or may not" in str(error)

    def failed(self, nodes: list) -> JobServiceUnavailable:
        """@return: the error of a call no node answered (each C{node.problem()} if no other)."""
        problems = self.problems or [node.problem() for node in nodes]
        message = problems[0]
        if len(problems) > 1:
            message = "no job service could be reached: " + "; ".join(dict.fromkeys(problems))
        if self.unknown:
            return unsure(message, self.op, self.kw.get("id"))
        return JobServiceUnavailable(message)


class CallSlots:
    """
    How many threads may be in a job call at once (C{--job-threads}), so that
    views that never touch jobs keep threads while the job service is slow. A call
    beyond waits while the youngest holder began less than L{QUICK} seconds ago,
    for at most L{WAIT} seconds; else it is refused.
    """

    QUICK = 0.25
    WAIT = 1.0

    def __init__(self, limit: int):
        self.limit = limit
        self.refused = 0
        self._holders: dict[int, float] = {}
        self._tokens = 0
        self._cond = threading.Condition()
        self._warned_at: float | None = None

    @property
    def taken(self) -> int:
        return len(self._holders)

    def take(self) -> int | None:
        """@return: the slot taken (give it back), or C{None}: refused."""
        deadline = time.monotonic() + self.WAIT
        with self._cond:
            while len(self._holders) >= self.limit:
                now = time.monotonic()
                age = now - max(self._holders.values())
                if age >= self.QUICK or now >= deadline:
                    break
                self._cond.wait(min(deadline - now, self.QUICK - age))
            else:
                self._tokens += 1
                self._holders[self._tokens] = time.monotonic()
                return self._tokens
            self.refused += 1
            if self._warned_at is None or now - self._warned_at >= 60:
                self._warned_at = now
                log.warn(
                    "{limit} threads wait for the job service already (--job-threads): a job "
                    "call was refused (said at most once a minute)",
                    limit=self.limit,
                )
        return None

    def give_back(self, token: int) -> None:
        with self._cond:
            self._holders.pop(token, None)
            self._cond.notify()

    def describe(self) -> dict:
        return {"busy": self.taken, "max": self.limit, "refused": self.refused}


def install(client: JobClient | None, call_threads: int | None = None) -> None:
    """Make C{client} this process's, with at most C{call_threads} threads in a call at once."""
    global _client, _slots
    _client = client
    _slots = CallSlots(call_threads) if client is not None and call_threads else None


def installed() -> JobClient | None:
    return _client


def call_slots() -> CallSlots | None:
    return _slots


def configured(name: str) -> str | None:
    from django.conf import settings

    return os.environ.get(name) or getattr(settings, name, None) or None


def configured_endpoints(state_dir: str | None = None) -> list[str]:
    """
    @return: the client endpoint strings of C{LRP_JOBS_CONNECT} (a list, or separated
        by commas), else of the socket in C{state_dir} (or C{LRP_STATE_DIR}, or C{.lrp}).
    """
    value = configured("LRP_JOBS_CONNECT") or ""
    items = value if isinstance(value, list | tuple) else split_endpoints(value)
    if endpoints := [str(item).strip() for item in items if str(item).strip()]:
        return endpoints
    state = state_dir or configured("LRP_STATE_DIR") or ".lrp"
    return [unix_client_endpoint(os.path.join(state, "jobs.sock"))]


def split_endpoints(text: str) -> list[str]:
    """@return: the endpoint strings of C{text} between unescaped commas, stripped."""
    return [endpoint.strip() for endpoint in _split(text, ",", False) if endpoint.strip()]


def _split(text: str, separator: str, unescape: bool) -> list[str]:
    """@return: the parts of C{text} between unescaped C{separator}s (unescaped if C{unescape})."""
    parts = [""]
    for token in re.findall(r"\\.?|.", text, re.DOTALL):  # a character, or one escaped
        if token == separator:
            parts.append("")
        else:
            parts[-1] += token[1:] if unescape and token[0] == "\\" else token
    return parts


def jobs_timeout() -> float:
    """@return: C{LRP_JOBS_TIMEOUT}, a job call's seconds. @raise ValueError: not a number."""
    from django.conf import settings

    return float(getattr(settings, "LRP_JOBS_TIMEOUT", DEFAULT_TIMEOUT))


def configured_login(secret_file: str | None = None) -> tuple[bytes | None, float]:
    """@return: the secret of C{secret_file} (else C{LRP_JOBS_SECRET_FILE}), C{LRP_JOBS_TIMEOUT}."""
    secret_file = secret_file or configured("LRP_JOBS_SECRET_FILE")
    return (wire.read_secret(secret_file) if secret_file else None), jobs_timeout()


def unix_client_endpoint(path: str) -> str:
    """@return: the client endpoint string of the UNIX socket at C{path}."""
    return "unix:path=" + os.path.abspath(path).replace("\\", "\\\\").replace(":", "\\:")


def call(op: str, call_timeout: float | None = None, **kw):
    """
    Run one job service operation from any thread but the reactor's.
    @return: its answer. @raise JobError: the service refused it (a subclass says
        why), or L{JobServiceUnavailable}: it cannot be reached or answer in time.
    """
    if op == "submit" and "payload" not in kw:
        kw["payload"] = encode_payload(kw.pop("args"), kw.pop("kwargs"))
    from twistedlrp.jobs import eager

    if eager.enabled():
        return eager.call(op, kw)
    if op in ("submit", "cancel") and (answer := transactions.in_transaction(op, kw)):
        return answer
    if op == "submit" and kw.get("id") is None:
        # Chosen before it is sent: sent again (its answer lost), it is the same job.
        kw["id"] = str(uuid.uuid4())
    slots = _slots
    if slots is None or reactor_bridge.in_reactor_thread():
        # (From the reactor thread the call is refused below: it must not wait for a slot.)
        return _call(op, kw, call_timeout)
    slot = slots.take()
    if slot is None:
        raise JobServiceUnavailable(
            f"{slots.limit} threads wait for the job service already (--job-threads): "
            f"{op} was not sent; try again shortly"
        )
    try:
        return _call(op, kw, call_timeout)
    finally:
        slots.give_back(slot)


def _call(op: str, kw: dict, call_timeout: float | None):
    client = _client
    if client is None and not reactor_bridge.twistd_runs_reactor():
        from twistedlrp.jobs.client.blocking import blocking_client

        if (blocking := blocking_client()) is not None:
            return blocking.request(op, kw, call_timeout)
    timeout = call_timeout or (client.timeout if client else DEFAULT_TIMEOUT)

    def run():
        # In the reactor thread: the first call builds this process's client from its settings.
        global _client
        if _client is None:
            from twisted.internet import reactor

            from twistedlrp.jobs.client.connection import JobClient

            client = JobClient(reactor, configured_endpoints(), *configured_login())
            client.start()
            _client = client
        return defer.ensureDeferred(_client.request(op, kw, call_timeout))

    try:
        return reactor_bridge.call_in_reactor(run, timeout=2 * timeout + 1)
    except TimeoutError as e:
        raise JobServiceUnavailable(f"the job service did not answer in time ({e})") from None


def encode_payload(args, kwargs) -> bytes:
    """@return: a submission's JSON. @raise InvalidArguments, PayloadTooLarge: not JSON, too big."""
    try:
        payload = json.dumps(
            {"args": list(args), "kwargs": dict(kwargs)}, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as e:
        raise InvalidArguments(
            f"job arguments must be JSON (lists, dicts, strings, numbers, booleans, None): {e}"
        ) from None
    data = payload.encode()
    if len(data) > framing.CHUNK * wire.MAX_CHUNKS:
        raise PayloadTooLarge(f"the job's arguments take {len(data)} bytes of JSON")
    return data


def socket_address(endpoint: str) -> tuple[int, object] | None:
    """
    @return: C{(address family, address)} of a C{unix:} or C{tcp:} client endpoint
        string, or C{None} for any other (or with options such as C{bindAddress}).
    """
    kind, *rest = _split(endpoint, ":", True)
    positional = [p for p in rest if "=" not in p] + [None, None]
    named = dict(p.split("=", 1) for p in rest if "=" in p)
    if set(named) - {"host", "port", "path", "timeout", "lockfile", "checkPID"}:
        return None
    if kind == "unix":
        path = named.get("path") or positional[0]
        return (socket.AF_UNIX, path) if path else None
    if kind == "tcp":
        host = named.get("host") or positional[0]
        port = named.get("port") or positional[1]
        if not host or not port or not port.isdigit():
            return None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, int(port))
    return None
