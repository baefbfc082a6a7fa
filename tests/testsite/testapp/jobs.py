"""Job functions of the test site. Markers go to the directory the test passes."""

import os
import sys
import time
from pathlib import Path

from twistedlrp.jobs import cancelled, job, progress

# A worker child (and only a worker: the server imports this module too) that
# cannot start, for the test of the pool's back-off.
if os.environ.get("LRP_TEST_WORKER_BOOT_FAIL") and "--worker-id" in sys.argv:
    raise RuntimeError("this worker fails to start on purpose")
if os.environ.get("LRP_TEST_TEMPLATE_BOOT_FAIL") and "--template" in sys.argv:
    raise RuntimeError("this worker template fails to start on purpose")
if os.environ.get("LRP_TEST_TEMPLATE_THREAD") and "--template" in sys.argv:
    # What an error reporter's background sender does at import.
    import threading

    threading.Thread(target=threading.Event().wait, name="import-time-sender", daemon=True).start()


def _mark(marker_dir, name, text=""):
    if marker_dir:
        with open(Path(marker_dir) / name, "a") as f:
            f.write(f"{os.getpid()} {text}\n")


@job
def add(a, b):
    return a + b


@job
def whoami():
    return {"pid": os.getpid()}


@job
def stored_jobs():
    """This worker's pid and how many jobs the database holds (a query of its own)."""
    from twistedlrp.models import Job

    return {"pid": os.getpid(), "jobs": Job.objects.count()}


@job
def loaded_modules(prefix):
    """The modules named C{prefix} or C{prefix.*} that this worker has imported."""
    return sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))


@job
def echo(data):
    return data


@job
def fail():
    raise ValueError("this job fails on purpose")


@job
def record(marker_dir, n):
    """Counts its runs: one line per run in marker_dir/run-<n>."""
    _mark(marker_dir, f"run-{n}")
    return n


@job
def steps(count, delay, marker_dir=None):
    """Reports progress; writes marker 'steps-started' once running."""
    _mark(marker_dir, "steps-started")
    for i in range(count):
        progress(i + 1, count, f"step {i + 1}")
        # The job's own output: the service logs it and keeps its tail.
        sys.stdout.write(f"step {i + 1} of {count}\n")
        sys.stdout.flush()
        time.sleep(delay)
    return {"steps": count, "pid": os.getpid()}


def _hang_unless_second_attempt(marker_dir, name):
    path = Path(marker_dir) / f"{name}-attempts"
    first = not path.exists()
    _mark(marker_dir, f"{name}-attempts")
    if first:
        time.sleep(120)
    return "second attempt succeeded"


@job(retries=1, retry_delay=0.1)
def crash_with_retry(marker_dir):
    return _hang_unless_second_attempt(marker_dir, "crash_with_retry")


@job
def crash_without_retry(marker_dir):
    return _hang_unless_second_attempt(marker_dir, "crash_without_retry")


@job(timeout=1.5)
def too_slow(marker_dir):
    _mark(marker_dir, "too_slow")
    time.sleep(120)


@job
def cooperative(marker_dir):
    _mark(marker_dir, "cooperative")
    while not cancelled():
        time.sleep(0.02)
    _mark(marker_dir, "cooperative-stopped")
    return "stopped"


@job
def stubborn(marker_dir):
    _mark(marker_dir, "stubborn")
    time.sleep(120)


@job
def sleeper(marker_dir, seconds, name="sleeper"):
    _mark(marker_dir, f"{name}-started")
    time.sleep(seconds)
    _mark(marker_dir, f"{name}-done")
    return name


@job(retries=2, retry_delay=0.1)
def ticker(marker_dir, name, seconds):
    """
    Runs C{seconds}, writing to marker_dir/<name> a line "start PID TIME",
    then "tick PID TIME" every 50 ms, and "done PID TIME" at its end (with
    several job nodes, the times show whether two runs overlapped).
    """
    path = Path(marker_dir) / name

    def line(what):
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()} {time.time():.3f}\n")

    line("start")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
        line("tick")
    line("done")
    return name


@job
def big_result(size):
    return "x" * size


@job
def not_json_result():
    return {1, 2, 3}


@job
def nul_characters(where):
    """A NUL character (PostgreSQL's text and jsonb refuse it) in one part of the job's record."""
    if where == "output":
        sys.stdout.write("before\x00after\n")
        sys.stdout.flush()
    elif where == "progress":
        progress(1, 1, "step\x00one")
    elif where == "error":
        raise ValueError("bad\x00byte")
    elif where == "result":
        return {"text": "a\x00b"}
    return where


@job
def huge_progress():
    """Progress beyond a 64-bit column: no database can store this job's record whole."""
    progress(2**70, 2**70, "too big")
    return "done"


@job
def submit_and_wait(a, b):
    """A job that submits a job, through the job service its worker was told of, and waits."""
    from twistedlrp import jobs

    child = add.submit(a, b)
    return {"child": child.id, "result": jobs.wait(child.id, timeout=20).result}


def _tree(marker_dir, name, ignore_term):
    """
    Start `sleep 300` (ignoring SIGTERM if asked), write its pid and the
    worker's to marker_dir/<name>-tree, wait for it. A second run of the
    same name (the marker exists) returns at once.
    """
    import subprocess

    marker = Path(marker_dir) / f"{name}-tree"
    if marker.exists():
        return "second run"
    command = ["sleep", "300"]
    if ignore_term:
        # An ignored signal stays ignored across exec.
        command = ["sh", "-c", "trap '' TERM; exec sleep 300"]
    child = subprocess.Popen(command)
    marker.write_text(f"{child.pid} {os.getpid()}\n")
    child.wait()
    return "the subprocess ended"


@job
def process_tree(marker_dir, name, ignore_term=False):
    return _tree(marker_dir, name, ignore_term)


@job(timeout=1)
def process_tree_timeout(marker_dir, name):
    return _tree(marker_dir, name, False)


@job
def huge_error(size):
    """Fails with an exception whose text takes `size` characters."""
    raise ValueError("begin " + "x" * size + " end")


@job
def progress_unencodable():
    """Reports progress with a message UTF-8 cannot carry (a lone surrogate)."""
    progress(1, 2, "file \udcff.txt")
    return "done"


# Retention (tests/test_jobs_retention.py): jobs with a keep of their own.
@job(keep=2)
def short_lived(n):
    return n


@job(keep="forever")
def kept_forever(n):
    return n


@job
def gated_steps(marker_dir, count):
    """Reports step i of count once the file marker_dir/go-<i> exists (the test steps it)."""
    _mark(marker_dir, "gated-started")
    for i in range(1, count + 1):
        while not (Path(marker_dir) / f"go-{i}").exists():
            if cancelled():
                return {"steps": i - 1, "cancelled": True}
            time.sleep(0.01)
        progress(i, count, f"step {i} of {count}")
    return {"steps": count}


# A job with a schedule of its own (every second), for the periodic job tests
# only: every other server has no schedule.
if os.environ.get("LRP_TEST_TICK_DIR"):

    @job(schedule="* * * * * *")
    def tick():
        """Counts its runs: one line per run in $LRP_TEST_TICK_DIR/tick."""
        _mark(os.environ["LRP_TEST_TICK_DIR"], "tick")


@job
def log_records(message):
    """Logs C{message} through stdlib logging at INFO and WARNING, and an error with a traceback."""
    import logging

    logger = logging.getLogger("testapp.jobs")
    logger.info("info: %s", message)
    logger.warning("warning: %s", message)
    try:
        raise KeyError(message)
    except KeyError:
        logger.exception("error: %s", message)
    sys.stdout.write(f"printed: {message}\n")
    return message


@job
def read_note(note_id):
    """The text of a note the submitting view wrote (DoesNotExist before its commit)."""
    from testapp.models import Note

    return Note.objects.get(id=note_id).text


def _runs(path, tag, seconds):
    # One write per line (O_APPEND): lines of concurrent workers do not mix.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag} start {os.getpid()}\n".encode())
        time.sleep(seconds)
        os.write(fd, f"{tag} end {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return tag


@job
def counted_run(path, tag, seconds=0.02):
    """Record each run of the job C{tag} (its start and end) in the file C{path}."""
    return _runs(path, tag, seconds)


@job(retries=1, retry_delay=0.1)
def counted_run_retried(path, tag, seconds=0.02):
    """L{counted_run} with one retry."""
    return _runs(path, tag, seconds)
