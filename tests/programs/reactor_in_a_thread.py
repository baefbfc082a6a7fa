"""
Exercises twistedlrp.call_in_reactor and twistedlrp.http in a process that
has no running reactor (like `manage.py shell` or another WSGI server), and
prints one JSON object of outcomes for tests/test_threads.py to check.
"""

import json
import sys
import threading
import time

from twisted.internet import defer, reactor, task

from twistedlrp import http, reactor_bridge
from twistedlrp.reactor_bridge import ShutdownInProgress, call_in_reactor

outcomes = {}


def record(name, fn):
    try:
        outcomes[name] = {"value": fn()}
    except Exception as e:
        outcomes[name] = {"error": type(e).__name__, "message": str(e)}


def in_reactor_thread_name():
    return threading.current_thread().name


async def coroutine_value():
    await task.deferLater(reactor, 0.01, lambda: None)
    return "from a coroutine"


cancelled = []


def never_fires():
    d = defer.Deferred(lambda _: cancelled.append(True))
    return d


def fails():
    raise KeyError("inside the reactor")


record("plain", lambda: call_in_reactor(lambda a, b=0: a + b, 2, b=3))
record("thread", lambda: call_in_reactor(in_reactor_thread_name))
record("deferred", lambda: call_in_reactor(lambda: task.deferLater(reactor, 0.01, lambda: "later")))
record("coroutine", lambda: call_in_reactor(coroutine_value))
record("error", lambda: call_in_reactor(fails))
started = time.monotonic()
record("timeout", lambda: call_in_reactor(never_fires, timeout=0.3))
outcomes["timeout_took"] = time.monotonic() - started


def cancelled_seen():
    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(cancelled)


outcomes["timeout_cancelled_the_deferred"] = cancelled_seen()
record("from_reactor_thread", lambda: call_in_reactor(lambda: call_in_reactor(lambda: 1)))

port = int(sys.argv[1])
record("http_get", lambda: http.get(f"http://127.0.0.1:{port}/hello", timeout=5).text)
record(
    "http_json", lambda: http.get(f"http://127.0.0.1:{port}/-/health", timeout=5).json()["status"]
)
record("http_refused", lambda: http.get("http://127.0.0.1:1/", timeout=5))
record("http_timeout", lambda: http.get(f"http://127.0.0.1:{port}/sleep?seconds=3", timeout=0.5))

# A caller still waiting when shut-down begins is woken at once.
waiter_started = time.monotonic()
waiter = threading.Thread(
    target=record, args=("woken_by_shutdown", lambda: call_in_reactor(never_fires, timeout=30))
)
waiter.start()
time.sleep(0.2)
reactor_bridge.begin_shutdown()
waiter.join(10)
outcomes["woken_after"] = time.monotonic() - waiter_started
record("after_shutdown", lambda: call_in_reactor(lambda: 1))
outcomes["shutdown_error_is_runtime_error"] = issubclass(ShutdownInProgress, RuntimeError)

sys.stdout.write(json.dumps(outcomes) + "\n")
