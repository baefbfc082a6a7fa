"""
The job client of views that run in the process hosting the job service
(L{LocalClient}): the service's methods are called in the reactor, with no
AMP and no socket; answers are copied as the wire would copy them, and an
unexpected error becomes a L{JobError}, as the AMP front end makes it.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs import limits
from twistedlrp.jobs.client import COMMANDS, no_answer
from twistedlrp.jobs.errors import JobError, JobServiceUnavailable

log = Logger()


class LocalClient:
    """
    The job service of this very process, called directly: a view's call
    runs the service's method in the reactor (through
    L{twistedlrp.threads.call_in_reactor}, as every call does) without AMP,
    a socket or a second reactor turn. Answers and errors are those of
    L{JobClient.request}; the answer is a copy (as if it had crossed the
    wire), and the service's unexpected errors become a L{JobError}, as the
    AMP front end makes them.

    @param service: the L{twistedlrp.jobs.service.JobService}.
    @param description: the endpoint named in messages.
    """

    def __init__(self, reactor, service, timeout: float, description: str):
        self.reactor = reactor
        self.service = service
        self.timeout = timeout
        self.endpoint = description
        self.last_error: str | None = None

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    async def request(self, op: str, kw: dict, timeout: float | None = None):
        """
        @return: the operation's answer.
        @raise JobError: the service's own error (a subclass says which).
        @raise JobServiceUnavailable: the service did not answer in time.
        """
        limit = timeout or self.timeout
        listening = self.service.when_listening()
        if not listening.called:
            # Starting: wait for it, as a connection to it would.
            listening.addTimeout(limit, self.reactor)
            try:
                await listening
            except defer.TimeoutError:
                raise JobServiceUnavailable(
                    f"the job service at {self.endpoint} could not be reached within "
                    f"{limit:g} s (it is starting)"
                ) from None
        _, _, arguments = COMMANDS[op](kw)
        method, args = _LOCAL[op](arguments)
        d = defer.maybeDeferred(getattr(self.service, method), *args)
        d.addTimeout(limit, self.reactor)
        try:
            answer = await d
        except defer.TimeoutError:
            raise no_answer(self.endpoint, op, limit, kw.get("id")) from None
        except JobError:
            raise
        except Exception as e:
            limits.internal_errors.failure(
                log, Failure(), "Job service operation {op} failed", op=method
            )
            raise JobError(f"internal error in the job service: {str(e)[:500]}") from None
        # A copy, as the wire gives each caller its own.
        return json.loads(json.dumps(answer))


# The service's method for each operation, and its arguments in order.
_LOCAL = {
    "submit": lambda a: (
        "submit",
        (a["name"], a["payload"], a["priority"], a["run_after"], a["key"], a["timeout"], a["id"]),
    ),
    "announce": lambda a: ("announce", (a["job_ids"],)),
    "status": lambda a: ("status", (a["job_id"],)),
    "cancel": lambda a: ("cancel", (a["job_id"],)),
    "wait": lambda a: ("wait", (a["job_id"], a["timeout"], a["seen"])),
    "list_jobs": lambda a: ("list_jobs", (a["state"], a["name"], a["limit"])),
    "stats": lambda a: ("stats", ()),
}


# What a caller must know when an answer is lost: the request may have taken effect.
