"""
A worker child: ``python -m twistedlrp.jobs.child --settings MODULE
[--pythonpath DIR]... --worker-id ID --max-payload BYTES``.

It sets Django up, imports the site's job modules, then speaks AMP with
the job service over fd 3 (commands in) and fd 4 (answers out), leaving
stdout and stderr to the jobs. Jobs run one at a time in one job thread,
so the reactor stays free to pass progress reports and cancellation.

The child leads a session (and process group) of its own, which the
processes its jobs start inherit: the job service signals the whole group.
When fd 3 reaches end of file (the parent retires it, or is gone) the child
kills whatever else is left in its group and exits at once.

A job's error is cut to a bounded size here (see L{describe_error}), so an
exception with a huge text never crosses the pipe whole.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import signal
import sys
import threading
import traceback

from twisted.internet import defer

from twistedlrp.jobs import _context, wire
from twistedlrp.jobs.workers import MAX_ERROR, cut_text

# The parts of a job's error text: its message, each line of its traceback.
MAX_MESSAGE = 16 * 1024
MAX_TRACEBACK_LINE = 4 * 1024


def _parse(argv):
    parser = argparse.ArgumentParser(prog="twistedlrp.jobs.child")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--pythonpath", action="append", default=[])
    parser.add_argument("--worker-id", default="worker")
    parser.add_argument("--max-payload", type=int, default=1024 * 1024)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    # A session and process group of our own, before any job can start a
    # process: the job service ends a job's whole process tree with killpg.
    try:
        os.setsid()
    except OSError:
        pass  # Then the job service signals this process alone.
    args = _parse(sys.argv[1:] if argv is None else argv)
    # Were we still in the server's group, a Ctrl-C there must not stop us:
    # the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from twistedlrp import boot
    from twistedlrp.jobs import registry

    try:
        boot.prepare_path(args.pythonpath)
        boot.configure_settings(args.settings)
        import django

        django.setup()
        registry.discover()
        boot.close_connections()
    except Exception as e:
        sys.stderr.write(f"worker {args.worker_id}: cannot start: {e}\n")
        sys.stderr.flush()
        os._exit(3)

    from twisted.internet import reactor, stdio

    conversation = ChildProtocol(reactor, args.max_payload)
    stdio.StandardIO(conversation, stdin=3, stdout=4, reactor=reactor)
    reactor.run(installSignalHandlers=False)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # The parent is gone, and the pipe with it.
    # The job thread may still run (the parent is gone): end it, and
    # whatever its job started, with us.
    end_group()
    os._exit(0)


def end_group() -> None:
    """
    SIGKILL the other processes of our process group (what jobs started),
    if we lead one and it has any; we go with them. The parent does the
    same once we have exited, but it may be gone (killed): this is what
    ends a job's subprocesses then.
    """
    group = os.getpid()
    try:
        if os.getpgrp() != group or not _others_in_group(group):
            return
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass


def _others_in_group(group: int) -> bool:
    """@return: whether a live process other than this one is in C{group} (true if unknown)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    me = str(os.getpid())
    for name in names:
        if not name.isdigit() or name == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != b"Z" and fields[2] == str(group).encode():
            return True
    return False


def describe_error(e: BaseException) -> str:
    """
    @return: C{"Type: message"}, a blank line and the traceback, each part
        cut to a bounded size (the message's beginning and end are kept, and
        the traceback's), L{MAX_ERROR} characters at most in all.
    """
    details = traceback.TracebackException(type(e), e, e.__traceback__)
    try:
        message = str(e)
    except Exception:
        message = "<str() of the exception failed>"
    head = f"{type(e).__name__}: {cut_text(message, MAX_MESSAGE)}"
    lines = (cut_text(line, MAX_TRACEBACK_LINE) for line in details.format())
    text = f"{head}\n\n{_join_bounded(lines, MAX_ERROR - len(head) - 2)}"
    return cut_text(text, MAX_ERROR)


def _join_bounded(lines, limit: int) -> str:
    """@return: the lines joined, their first and last ones when they take more than C{limit}."""
    half = limit // 2
    head, head_size = [], 0
    tail, tail_size = collections.deque(), 0
    cut = 0
    for line in lines:
        if not tail and head_size + len(line) <= half:
            head.append(line)
            head_size += len(line)
            continue
        tail.append(line)
        tail_size += len(line)
        while tail_size > limit - half - 64 and len(tail) > 1:
            dropped = tail.popleft()
            tail_size -= len(dropped)
            cut += len(dropped)
    marker = [f"[... {cut} characters cut ...]\n"] if cut else []
    return "".join(head + marker + list(tail))


class ChildProtocol(wire.QuietAMP):
    """The child's end of the AMP conversation with the job service."""

    def __init__(self, reactor, max_payload):
        super().__init__()
        self.reactor = reactor
        self.max_payload = max_payload
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_progress = None
        self._progress_scheduled = False
        self._lock = threading.Lock()
        threading.Thread(target=self._job_thread, name="twistedlrp-job", daemon=True).start()

    def connectionMade(self):
        super().connectionMade()
        self.callRemote(wire.WorkerReady, pid=os.getpid())

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self.reactor.running:
            self.reactor.stop()

    @wire.RunJob.responder
    def run_job(self, job_id, name, payload, attempt):
        d = defer.Deferred()
        self.jobs.put((job_id, name, payload, attempt, d))
        return d

    @wire.CancelJob.responder
    def cancel_job(self, job_id):
        _context.request_cancel(job_id)
        return {}

    # -- the job thread ---------------------------------------------------

    def _job_thread(self):
        while True:
            job_id, name, payload, attempt, d = self.jobs.get()
            outcome = self._run(job_id, name, payload)
            self.reactor.callFromThread(self._answer, d, outcome)

    def _answer(self, d, outcome):
        self._flush_progress()
        d.callback({"outcome": outcome})

    def _run(self, job_id, name, payload) -> dict:
        from django.db import close_old_connections

        from twistedlrp.jobs import registry
        from twistedlrp.jobs.errors import JobCancelled

        definition = registry.lookup(name)
        if definition is None:
            return {"ok": False, "error": f"no job named {name!r} is registered in the worker"}
        _context.begin(job_id, lambda *p: self._report(job_id, *p))
        close_old_connections()
        try:
            data = json.loads(payload)
            result = definition.function(*data["args"], **data["kwargs"])
            try:
                encoded = json.dumps(result, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError) as e:
                return {"ok": False, "error": cut_text(f"the job's result is not JSON: {e}")}
            if len(encoded) > self.max_payload:
                return {
                    "ok": False,
                    "error": f"the job's result takes {len(encoded)} bytes of JSON, more "
                    f"than the limit of {self.max_payload} bytes (--max-job-payload)",
                }
            return {"ok": True, "result": result}
        except JobCancelled:
            return {"ok": False, "cancelled": True, "error": "cancelled"}
        except BaseException as e:
            return {
                "ok": False,
                "error": describe_error(e),
                "cancelled": _context.is_cancelled(),
            }
        finally:
            _context.end()
            sys.stdout.flush()
            sys.stderr.flush()
            close_old_connections()

    # Progress: only the latest report waits; the reactor sends it once.
    def _report(self, job_id, current, total, message):
        with self._lock:
            self._pending_progress = (job_id, current, total, message)
            if self._progress_scheduled:
                return
            self._progress_scheduled = True
        self.reactor.callFromThread(self._flush_progress)

    def _flush_progress(self):
        with self._lock:
            pending, self._pending_progress = self._pending_progress, None
            self._progress_scheduled = False
        if pending is not None:
            job_id, current, total, message = pending
            self.callRemote(
                wire.ReportProgress,
                job_id=job_id,
                current=current,
                total=total,
                message=message[:2000],
            )


if __name__ == "__main__":
    main()
