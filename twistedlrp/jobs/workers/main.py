"""
A worker child: ``python -m twistedlrp.jobs.workers.main --settings MODULE
[--pythonpath DIR]... --worker-id ID --max-payload BYTES``.
It sets Django up, then speaks AMP with the job service over fd 3 (commands in)
and fd 4 (answers out) without a reactor or Twisted's AMP, which keeps each
worker about 16 MB smaller. It leads a process group of its own, which the job
service signals whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import sys
import threading
import traceback

from twistedlrp.jobs.protocol.framing import BoxReader, encode_box, get_big, put_big
from twistedlrp.jobs.workers import context as _context
from twistedlrp.process.forkserver import flush_stdio

MAX_ERROR = 64 * 1024  # characters of a job's error text
# Its parts: the message, each line of the traceback.
MAX_MESSAGE = 16 * 1024
MAX_TRACEBACK_LINE = 4 * 1024


def main(argv=None) -> None:
    # A process group of our own, before any job can start a process: the job
    # service ends a job's whole process tree with killpg.
    with contextlib.suppress(OSError):  # then the job service signals this process alone
        os.setsid()
    parser = argparse.ArgumentParser(prog="twistedlrp.jobs.workers.main")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--pythonpath", action="append", default=[])
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--max-payload", type=int, required=True)
    # Fork workers on request (twistedlrp.jobs.workers.preload).
    parser.add_argument("--template", action="store_true")
    args = parser.parse_args(argv)
    # Were we still in the server's group, its Ctrl-C must not stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from twistedlrp import boot
    from twistedlrp.jobs import registry

    try:
        boot.prepare_path(args.pythonpath)
        boot.configure_settings(args.settings)
        boot.django_setup()
        # As in the server: jobs write concurrently with it and each other.
        boot.sqlite_immediate_transactions()
        from twistedlrp import stdlog

        stdlog.install_worker_handler()
        registry.discover()
        boot.close_connections()
    except Exception as e:
        what = "worker template" if args.template else f"worker {args.worker_id}"
        sys.stderr.write(f"{what}: cannot start: {e}\n")
        sys.stderr.flush()
        os._exit(3)

    from twistedlrp.jobs.client import transactions

    transactions.limit_payload(args.max_payload)
    if args.template:
        serve_template()
    Conversation(args.max_payload).serve()
    flush_stdio()  # (if the parent is gone, with the pipe)
    # The parent is gone: the job thread, and what its job started, end with us.
    from twistedlrp.process.supervise import end_own_group

    end_own_group()
    os._exit(0)


#: A forked worker's stdout, stderr, command and answer pipes, as the pool sends them.
FORK_FDS = (1, 2, 3, 4)


def serve_template() -> None:
    """
    Be the worker template (L{preload}), a fork server on fd 3, until its control
    channel closes. Returns only in a forked child, whose fds 1 to 4 are its pipes.
    """
    import socket

    from twistedlrp.process.channel import BlockingChannel
    from twistedlrp.process.forkserver import ForkServer

    server = ForkServer(BlockingChannel(socket.socket(fileno=3)))
    # Threads that setting Django up started (an error reporter's sender,
    # say) are not in the forked workers: the pool warns about them.
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    server.send({"event": "ready", "pid": os.getpid(), "threads": others})
    template = os.getpid()
    try:  # Has this kernel pidfd_open, by which the pool watches orphans?
        os.close(os.pidfd_open(template))
        orphan_ok = True
    except (AttributeError, OSError):
        orphan_ok = False
    request = server.serve()
    if request is None:  # the job service closed the channel, or is gone
        os._exit(0)
    _become_worker(request["fds"], template, orphan_ok)


def _become_worker(fds: list[int], template: int, orphan_ok: bool) -> None:
    """In a child the template just forked: take the pool's pipes and be a worker."""
    os.setsid()
    if not orphan_ok:  # the pool could not see our end without the template: die with it
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        if os.getppid() != template:
            os._exit(1)  # It died before prctl took effect.
    # Each pipe onto its number, those already at a number they must leave moved first.
    fds = [os.dup(fd) if fd in FORK_FDS else fd for fd in fds]
    for target, fd in zip(FORK_FDS, fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def cut_text(text: str, limit: int = MAX_ERROR) -> str:
    """@return: C{text}, or its beginning and end around C{[... N characters cut ...]}: C{limit} at most."""
    if len(text) <= limit:
        return text
    keep = max(limit - 64, 0)
    head, tail = keep // 2, keep - keep // 2
    return f"{text[:head]}\n[... {len(text) - keep} characters cut ...]\n{text[len(text) - tail :]}"


def describe_error(e: BaseException) -> str:
    """@return: C{"Type: message"}, a blank line and the traceback, L{MAX_ERROR} characters at most."""
    try:
        message = str(e)
    except Exception:
        message = "<str() of the exception failed>"
    head = f"{type(e).__name__}: {cut_text(message, MAX_MESSAGE)}"
    lines = "".join(cut_text(line, MAX_TRACEBACK_LINE) for line in traceback.format_exception(e))
    return f"{head}\n\n{cut_text(lines, MAX_ERROR - len(head) - 2)}"


class Conversation:
    """
    The child's end of the AMP conversation: the main thread reads commands
    from C{commands}, a job thread runs one job at a time and writes its
    answer to C{answers}; a progress thread sends the latest progress report
    (older ones are dropped), always before the answer of its job.
    """

    def __init__(self, max_payload: int, commands: int = 3, answers: int = 4):
        self.max_payload, self.commands, self.answers = max_payload, commands, answers
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._progress = threading.Condition(threading.Lock())
        self._pending_progress = None

    def send(self, box: dict[bytes, bytes]) -> None:
        """Write one box (holding C{_write_lock})."""
        data = memoryview(encode_box(box))
        while data:
            try:
                written = os.write(self.answers, data)
            except OSError:  # the parent is gone
                return
            data = data[written:]

    def serve(self) -> None:
        """Say we are ready, then run until the commands reach end of file."""
        for run, name in ((self._job_thread, "job"), (self._progress_thread, "progress")):
            threading.Thread(target=run, name=f"twistedlrp-{name}", daemon=True).start()
        with self._write_lock:
            self.send({b"_command": b"WorkerReady", b"_ask": b"1", b"pid": b"%d" % os.getpid()})
        reader = BoxReader()
        while True:
            try:
                data = os.read(self.commands, 65536)
            except OSError:
                data = b""
            if not data:
                return
            for box in reader.feed(data):
                command = box.get(b"_command")
                if command == b"RunJob":
                    self.jobs.put(box)  # read by the job thread
                elif command == b"CancelJob":
                    _context.request_cancel(box[b"job_id"].decode("utf-8"))
                # Anything else answers what we sent (WorkerReady): nothing to do.

    def _job_thread(self) -> None:
        while True:
            box = self.jobs.get()
            module = box.get(b"module")
            job_id, name = box[b"job_id"].decode("utf-8"), box[b"name"].decode("utf-8")
            outcome = self._run(job_id, name, get_big(box, b"payload"), module and module.decode())
            try:
                encoded = json.dumps(outcome, separators=(",", ":")).encode()
            except (TypeError, ValueError) as e:
                # A value json cannot write (a lone surrogate in an error text).
                error = {"ok": False, "error": f"the job's outcome could not be sent: {e}"}
                encoded = json.dumps(error).encode()
            answer = {b"_answer": box[b"_ask"]}
            put_big(answer, b"outcome", encoded)
            with self._write_lock:
                self._send_progress()  # its last progress report first
                self.send(answer)

    def _progress_thread(self) -> None:
        while True:
            with self._progress:
                while self._pending_progress is None:
                    self._progress.wait()
            with self._write_lock:
                self._send_progress()

    def _send_progress(self) -> None:
        """Send the pending progress report, if any (holding C{_write_lock})."""
        with self._progress:
            pending, self._pending_progress = self._pending_progress, None
        if pending is None:
            return
        job_id, current, total, message = pending
        box = {
            b"_command": b"ReportProgress",
            b"job_id": job_id.encode("utf-8"),
            b"current": b"%d" % current,
        }
        if total is not None:
            box[b"total"] = b"%d" % total
        box[b"message"] = message[:2000].encode("utf-8", "replace")
        self.send(box)

    def _report(self, job_id, current, total, message) -> None:
        with self._progress:
            self._pending_progress = (job_id, current, total, message)
            self._progress.notify()

    def _run(self, job_id, name, payload, module=None) -> dict:
        from django.db import close_old_connections

        from twistedlrp.jobs import registry
        from twistedlrp.jobs.errors import JobCancelled

        definition = registry.lookup(name)
        problem = ""
        if definition is None and module:
            # Registered from a module the site's job modules do not import (a
            # third-party app's tasks): imported at its first job, not at start-up.
            problem = registry.import_registered(module)
            problem = f" ({problem})" if problem else ""
            definition = registry.lookup(name)
        if definition is None:
            return {
                "ok": False,
                "error": f"no job named {name!r} is registered in the worker{problem}",
            }
        _context.begin(job_id, lambda *p: self._report(job_id, *p))
        close_old_connections()
        try:
            return call_job(definition.function, payload, self.max_payload)
        except JobCancelled:
            return {"ok": False, "cancelled": True, "error": "cancelled"}
        except BaseException as e:
            return {"ok": False, "error": describe_error(e), "cancelled": _context.is_cancelled()}
        finally:
            _context.end()
            sys.stdout.flush()
            sys.stderr.flush()
            close_old_connections()


def call_job(function, payload: bytes, max_payload: int) -> dict:
    """
    Call a job's function with the arguments of its JSON C{payload}.
    @return: the outcome a worker sends: C{{"ok": True, "result": ...}}, or C{{"ok":
        False, "error": ...}} when the result is not JSON or larger than C{max_payload}.
    @raise BaseException: whatever the job raised.
    """
    data = json.loads(payload)
    result = function(*data["args"], **data["kwargs"])
    try:
        encoded = json.dumps(result, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        return {"ok": False, "error": cut_text(f"the job's result is not JSON: {e}")}
    if len(encoded) > max_payload:
        return {
            "ok": False,
            "error": f"the job's result takes {len(encoded)} bytes of JSON, more "
            f"than the limit of {max_payload} bytes (--max-job-payload)",
        }
    return {"ok": True, "result": result}


if __name__ == "__main__":
    main()
