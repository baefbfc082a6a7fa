"""Hooks of the test site, steered by environment variables."""

import os
import time

from twisted.application.service import Service
from twisted.internet import reactor, task

from twistedlrp.lifecycle import add_service, on_shutdown, on_startup

STATE = {"hook_done_at": None, "value": None}


def _note(line):
    path = os.environ.get("LRP_TEST_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{line} {time.time()}\n")


@on_startup
async def slow_start():
    delay = float(os.environ.get("LRP_TEST_HOOK_SLEEP", "0"))
    _note("startup-begin")
    if delay:
        await task.deferLater(reactor, delay, lambda: None)
    if os.environ.get("LRP_TEST_HOOK_FAIL"):
        raise ValueError("the test asked this hook to fail")
    STATE["value"] = "computed-by-hook"
    STATE["hook_done_at"] = time.time()
    _note("startup-end")


@on_shutdown
def first_registered_shutdown():
    _note("shutdown-first-registered")


@on_shutdown
async def last_registered_shutdown():
    _note("shutdown-last-registered")


class Recorder(Service):
    """A registered service whose start takes a moment (the server awaits it)."""

    def startService(self):
        _note("service-start-begin")
        super().startService()
        return task.deferLater(reactor, 0.2, _note, "service-start-end")

    def stopService(self):
        super().stopService()
        _note("service-stop")


add_service("recorder", Recorder())
