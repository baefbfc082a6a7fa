"""
The job client outside the server for C{unix:} and C{tcp:} endpoints (L{BlockingClient}):
no reactor thread, and no reader thread (L{_Conversation}).
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import threading
import time

from twisted.internet import defer

from twistedlrp.jobs.client.calls import (
    NO_SOCKET,
    TRIES_PER_NODE,
    Attempts,
    Node,
    broke_during,
    configured_endpoints,
    configured_login,
    no_answer,
    socket_address,
)
from twistedlrp.jobs.errors import AuthenticationFailed, JobServiceUnavailable, unsure
from twistedlrp.jobs.protocol import wire
from twistedlrp.jobs.protocol.framing import BoxReader

_lock = threading.Lock()


def blocking_client() -> BlockingClient | None:
    """@return: this process's L{BlockingClient}, or C{None} if an endpoint needs a reactor."""
    with _lock:
        return _blocking_client()


@functools.cache
def _blocking_client() -> BlockingClient | None:
    endpoints = configured_endpoints()
    addresses = [socket_address(endpoint) for endpoint in endpoints]
    return None if None in addresses else BlockingClient(endpoints, addresses, *configured_login())


class BlockingClient:
    """
    One AMP connection that every thread shares (the service commits their
    requests together), to the first endpoint (or list's) that answers and is not
    in its back-off; a thread of its own goes back to an earlier one once it answers.
    Answers, errors and failover are those of L{JobClient.request} (L{Attempts}).
    """

    def __init__(self, endpoints, addresses, secret: bytes | None, timeout: float):
        if isinstance(endpoints, str):
            endpoints, addresses = [endpoints], [addresses]
        self.nodes = [Node(endpoint, secret, time.monotonic) for endpoint in endpoints]
        self._addresses = dict(zip(self.nodes, addresses, strict=True))
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conversation: _Conversation | None = None
        self._probing = threading.Lock()  # held while a probe runs
        self._next_probe = 0.0

    def request(self, op: str, kw: dict, timeout: float | None = None):
        """@return: the answer. @raise JobError: the service's, or unreachable, or it broke."""
        attempts = Attempts(op, kw, timeout or self.timeout, time.monotonic())
        operation = wire.OPERATIONS[op]
        while True:
            conversation = self._connected(attempts.tries, attempts.deadline, attempts.problems)
            if conversation is None:
                raise attempts.failed(self.nodes)
            node = conversation.node
            attempts.tries[node] = attempts.tries.get(node, 0) + 1
            arguments = attempts.arguments(time.monotonic())
            left = max(attempts.deadline - time.monotonic(), 0.001)
            try:
                answer = conversation.ask(
                    operation.command, arguments, left, op, kw.get("id"), attempts.limit
                )
            except _NotSent:
                continue  # It broke before our request left: nothing happened; again.
            except _Broken as e:
                attempts.broke(str(e))
                continue
            except JobServiceUnavailable as e:
                attempts.refused(node, e, len(self.nodes))
                conversation.retire()
                continue
            self._maybe_probe(node)
            return answer[operation.answer]

    def _connected(self, tries: dict, deadline: float, problems: list[str]):
        """@return: a connection to a node this call may still try, or C{None}."""

        def current():
            c = self._conversation
            return c if c and c.usable() and tries.get(c.node, 0) < TRIES_PER_NODE else None

        if conversation := current():
            return conversation
        # Another thread may be connecting: wait for it, not beyond the deadline.
        if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0.001)):
            problems.append("another thread was still connecting to the job service")
            return None
        try:
            if conversation := current():
                return conversation
            # Those this call did not try yet first (in order), then the one whose connection broke.
            for node in sorted(self.nodes, key=lambda n: tries.get(n, 0)):
                if tries.get(node, 0) >= TRIES_PER_NODE or node.retry_at > time.monotonic():
                    continue
                if time.monotonic() >= deadline:
                    break
                try:
                    fresh = self._connect(node, deadline)
                except JobServiceUnavailable as e:
                    problems.append(str(e))
                    tries[node] = TRIES_PER_NODE
                    continue
                if self._conversation is not None:
                    self._conversation.retire()
                self._conversation = fresh
                return fresh
            if self._conversation is not None and not self._conversation.usable():
                self._conversation = None
            return None
        finally:
            self._lock.release()

    def _connect(self, node: Node, deadline: float) -> _Conversation:
        """One attempt to reach C{node} (and log in), within the timeout and C{deadline}."""
        family, address = self._addresses[node]
        if family == socket.AF_UNIX and not os.path.exists(address):
            node.down(NO_SOCKET)
            raise JobServiceUnavailable(node.problem())
        limit = max(min(self.timeout, deadline - time.monotonic()), 0.01)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(limit)
            sock.connect(address)
            sock.settimeout(None)
        except OSError as e:
            sock.close()
            node.down(e.strerror or type(e).__name__)
            raise JobServiceUnavailable(node.problem()) from None
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conversation = _Conversation(sock, node)
        if node.secret is not None:
            conversation.limit = limit
            try:
                # The reactor client's login, run to its end at once: each call's Deferred has fired.
                with contextlib.suppress(StopIteration):
                    wire.login(conversation, node.secret).send(None)
            except AuthenticationFailed as e:
                conversation.close("login refused")
                node.down(f"it refused the shared secret ({e})", refused=True)
                raise AuthenticationFailed(
                    f"the job service at {node.endpoint} refused the shared secret ({e})"
                ) from None
            except BaseException as e:
                conversation.close("login failed")
                if not isinstance(e, _NotSent | _Broken | JobServiceUnavailable):
                    raise
                node.down(f"login failed: {e}")
                raise JobServiceUnavailable(node.problem()) from None
        node.up()
        return conversation

    def _maybe_probe(self, node: Node) -> None:
        """Using a later endpoint: now and then, see in the background whether an earlier one answers."""
        if node is self.nodes[0] or time.monotonic() < self._next_probe:
            return
        if not self._probing.acquire(blocking=False):
            return  # One runs already.
        self._next_probe = time.monotonic() + node.backoff.maximum
        threading.Thread(
            target=self._probe, name="twistedlrp-job-client-probe", daemon=True
        ).start()

    def _probe(self) -> None:
        try:
            for node in self.nodes:
                current = self._conversation
                if current is not None and current.usable() and current.node is node:
                    return  # Nothing earlier answers.
                if node.retry_at > time.monotonic():
                    continue
                try:
                    fresh = self._connect(node, time.monotonic() + self.timeout)
                except Exception:
                    continue
                if not self._lock.acquire(timeout=self.timeout):
                    fresh.close("not needed")
                    return
                old, self._conversation = self._conversation, fresh
                self._lock.release()
                if old is not None:
                    old.retire()
                return
        finally:
            self._probing.release()


class _Broken(Exception):
    """The connection broke after the request was written: its outcome is unknown."""


class _NotSent(Exception):
    """The connection broke before the request was written."""


class _Waiter(threading.Event):
    """Set when its answer came (C{box}), the connection broke, or it is its turn to read."""

    box: dict | None = None
    broken: str | None = None


class _Conversation:
    """
    One blocking AMP connection, requests tagged. No thread of its own: a caller
    reads the socket while no other does, hands the answers it reads to their
    callers, then the reading to one still waiting (one wake-up per call, not three).
    """

    def __init__(self, sock: socket.socket, node: Node):
        self.sock = sock
        self.node = node
        self.reader = BoxReader()
        self.asks = 0
        self.pid = os.getpid()
        self.broken: str | None = None
        self.retired = False
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Waiter] = {}
        self._reading = False
        # Only the reader polls. (A socket timeout would bound other threads' sendall too.)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def usable(self) -> bool:
        # A copy in a forked process is its parent's connection.
        if self.broken is not None or self.retired or self.pid != os.getpid():
            return False
        if not self._pending:
            # Idle, nobody reads: a service that closed the connection (a
            # restart) is seen here, before a request is written to it.
            try:
                if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    self.close("the service closed the connection")
            except BlockingIOError:
                pass
            except OSError as e:
                self.close(e.strerror or str(e))
        return self.broken is None

    def retire(self) -> None:
        """Take no new request; close once the pending ones are answered."""
        with self._lock:
            self.retired = True
            idle = not self._pending
        if idle:
            self.close("replaced by another connection")

    def close(self, reason: str) -> None:
        with self._lock:
            if self.broken is not None:
                return
            self.broken = reason
            waiting, self._pending = list(self._pending.values()), {}
        for waiter in waiting:
            waiter.broken = reason
            waiter.set()
        if self.pid == os.getpid():
            # Not in a forked child: there the connection is still the
            # parent's, and a shutdown would end it for the parent too.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _hand_over(self) -> None:
        """Under the lock, nobody reading: wake a waiting caller to read in its turn."""
        if not self._reading and self._pending:
            next(iter(self._pending.values())).set()

    def _answer(self, waiter: _Waiter, tag: bytes, deadline: float) -> bool:
        """Wait for C{waiter}'s answer, reading if nobody does. @return: False: none in time."""
        while True:
            with self._lock:
                waiter.clear()
                if waiter.box is not None or waiter.broken is not None:
                    return True
                reads = not self._reading
                self._reading = True
            left = deadline - time.monotonic()
            if reads:
                came = False
                try:
                    came = left > 0 and self._read_until(waiter, left)
                finally:
                    # Whatever stopped it (an interrupt too), the reading goes on.
                    with self._lock:
                        self._reading = False
                        if not came:
                            self._pending.pop(tag, None)
                        self._hand_over()
                        done = self.retired and not self._pending
                if done:
                    self.close("replaced by another connection")
                return came
            if left <= 0 or not waiter.wait(left):
                with self._lock:
                    self._pending.pop(tag, None)
                    self._hand_over()
                return waiter.box is not None or waiter.broken is not None

    def _read_until(self, waiter: _Waiter, left: float) -> bool:
        """As the reader: hand out answers until C{waiter}'s. @return: False on timeout."""
        reason = "the service closed the connection"
        deadline = time.monotonic() + left
        try:
            while waiter.box is None:
                if not self._poll.poll(max(deadline - time.monotonic(), 0.0) * 1000):
                    return False
                data = self.sock.recv(65536)
                if not data:
                    break
                for box in self.reader.feed(data):
                    tag = box.get(b"_answer") or box.get(b"_error")
                    with self._lock:
                        other = self._pending.pop(tag, None)
                    if other is not None:
                        other.box = box
                        other.set()
            return True
        except OSError as e:
            reason = e.strerror or str(e)
        except ValueError as e:  # not AMP (BoxReader)
            reason = str(e)
        self.close(reason)
        return True

    def callRemote(self, command, **arguments) -> defer.Deferred:
        """@return: the fired Deferred of L{ask} of a login command, within C{limit}."""
        return defer.maybeDeferred(self.ask, command, arguments, self.limit, "login")

    def ask(self, command, arguments, timeout: float, op: str, job_id=None, limit=None) -> dict:
        """
        @param limit: the call's timeout, as its error says it. @return: the parsed answer.
        @raise _NotSent: the connection had broken before the request was written.
        @raise _Broken: it broke after (the outcome is unknown).
        """
        waiter = _Waiter()
        box = command.makeArguments(arguments, None)
        with self._lock:
            if self.broken is not None:
                raise _NotSent(self.broken)
            self.asks += 1
            tag = b"%d" % self.asks
            box[b"_command"] = command.commandName
            box[b"_ask"] = tag
            self._pending[tag] = waiter
            try:
                # Under the lock: one request's bytes never mix with another's.
                self.sock.sendall(box.serialize())
                sent = None
            except OSError as e:
                self._pending.pop(tag, None)
                sent = e.strerror or str(e)
        if sent is not None:
            self.close(sent)
            raise _Broken(broke_during(self.node.endpoint, op, sent))
        if not self._answer(waiter, tag, time.monotonic() + timeout):
            raise no_answer(self.node.endpoint, op, limit or timeout, job_id)
        if waiter.box is None:
            raise _Broken(broke_during(self.node.endpoint, op, waiter.broken))
        if b"_error" not in waiter.box:
            return command.parseResponse(waiter.box, None)
        code = waiter.box.get(b"_error_code", b"")
        description = waiter.box.get(b"_error_description", b"").decode("utf-8", "replace")
        error_class = command.reverseErrors.get(code)
        if error_class is None:
            raise unsure(
                f"the job service at {self.node.endpoint} failed during {op}: {description}", op
            )
        if code in command.fatalErrors.values():
            self.close(description)  # the service closes it too
        raise error_class(description)
