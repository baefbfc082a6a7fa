"""
Log in to a Perspective Broker job listener and ask for its stats, timed
from the connection to the answer; print one JSON line: {"seconds": ...,
"stats": true} or {"seconds": ..., "error": "..."}.

    python pb_login.py PORT SECRET [SOURCE_ADDRESS] [TIMES]

TIMES logins are made one after another (1 by default); the line reports
the slowest.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.cred import credentials
from twisted.internet import defer, task
from twisted.spread import pb


async def login_once(reactor, port: int, secret: bytes, source: str) -> float:
    factory = pb.PBClientFactory()
    started = time.monotonic()
    reactor.connectTCP("127.0.0.1", port, factory, timeout=10, bindAddress=(source, 0))
    try:
        avatar = await factory.login(credentials.UsernamePassword(b"lrp", secret))
        stats = await avatar.callRemote("stats")
        assert "counters" in stats, stats
        return time.monotonic() - started
    finally:
        factory.disconnect()


async def main(reactor, port, secret, source="127.0.0.1", times="1"):
    slowest = 0.0
    try:
        for _ in range(int(times)):
            attempt = defer.ensureDeferred(login_once(reactor, int(port), secret.encode(), source))
            attempt.addTimeout(10, reactor)
            slowest = max(slowest, await attempt)
        sys.stdout.write(json.dumps({"seconds": slowest, "stats": True}) + "\n")
    except Exception as e:
        sys.stdout.write(json.dumps({"seconds": slowest, "error": repr(e)}) + "\n")


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
