"""The job client of views in the process that hosts the job service (L{LocalClient})."""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp.jobs.client.calls import no_answer, unreachable
from twistedlrp.jobs.errors import JobServiceUnavailable
from twistedlrp.jobs.protocol import limits, wire

log = Logger()


class LocalClient:
    """
    The job service of this very process, called in the reactor without AMP, a
    socket or a second encoding (C{description} names it in messages); answers
    and errors are those of L{JobClient.request}.
    """

    def __init__(self, reactor, service, timeout: float, description: str):
        self.reactor = reactor
        self.service = service
        self.timeout = timeout
        self.endpoint = description

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    async def request(self, op: str, kw: dict, timeout: float | None = None):
        """@return: the answer. @raise JobError: the service's, or it did not answer in time."""
        limit = timeout or self.timeout
        listening = self.service.when_listening()
        if not listening.called:
            # Starting: wait for it, as a connection to it would.
            listening.addTimeout(limit, self.reactor)
            try:
                await listening
            except defer.TimeoutError:
                raise JobServiceUnavailable(
                    unreachable(self.endpoint, detail=f" within {limit:g} s (it is starting)")
                ) from None
        operation = wire.OPERATIONS[op]
        d = limits.guarded(
            log, op, operation.call, self.service.operations, operation.arguments(kw)
        )
        d.addTimeout(limit, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise no_answer(self.endpoint, op, limit, kw.get("id")) from None
