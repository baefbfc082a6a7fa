"""
The group-commit thread (twistedlrp.jobs.store.batch) on SQLite: what is
queued while a transaction runs shares the next commit; a failing
operation undoes none of the others; an operation that cannot begin before
its deadline is withdrawn and never runs; coalesced values are written
newest only; stopping finishes what is queued. Django is set up in a child
process of its own (this pytest process keeps no settings), driven by a
real reactor; tests/test_store_batch.py breaks a PostgreSQL connection.
"""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sys.argv[1]}},
    )
    django.setup()
    from django.db import connection
    from twisted.internet import defer, reactor, task
    from twistedlrp.jobs.store.batch import StoreUnavailable
    from twistedlrp.jobs.store.batch import GroupCommitThread

    with connection.cursor() as c:
        c.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER)")
    connection.close()

    def put(k, v):
        with connection.cursor() as c:
            c.execute("INSERT INTO kv VALUES (%s, %s)", [k, v])
        return k

    def fails():
        put("undone", 0)
        raise ValueError("this one fails")

    def rows():
        with connection.cursor() as c:
            c.execute("SELECT k, v FROM kv ORDER BY k")
            return [list(r) for r in c.fetchall()]

    written = []
    def write_coalesced(values):
        written.append(dict(values))
        for k, v in values.items():
            put(f"coalesced-{k}", v)

    gate, entered = threading.Event(), threading.Event()
    def held():
        entered.set()
        if not gate.wait(10):
            raise RuntimeError("never released")
        return "held"

    thread = GroupCommitThread(reactor, "test-batch", write_coalesced)
    sizes = []
    thread.observe_batch = sizes.append
    out = {}

    async def main():
        thread.start()
        first = thread.run(held)
        for _ in range(1000):
            if entered.is_set():
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        # Queued while the first transaction runs: one batch, one commit.
        batch = [thread.run(put, f"k{i}", i) for i in range(4)] + [thread.run(fails)]
        late = thread.run(put, "late", 1, within=0.2)
        thread.coalesce("x", 1)
        thread.coalesce("x", 2)
        try:
            await late
        except StoreUnavailable as e:
            out["late"] = {"started": e.started, "message": str(e)}
        gate.set()
        out["first"] = await first
        results = await defer.DeferredList(batch, consumeErrors=True)
        out["batch"] = [
            ok and value or value.type.__name__ for ok, value in results
        ]
        queued = [thread.run(put, f"s{i}", i) for i in range(3)]
        stopped = thread.stop()
        out["stopped"] = await stopped is None
        out["queued"] = [d.called for d in queued]
        out["after_stop"] = type((await defer.DeferredList([thread.run(rows)], consumeErrors=True))[0][1].value).__name__
        out["sizes"] = sizes
        out["written"] = written
        out["rows"] = rows()

    def run():
        d = defer.ensureDeferred(main())
        d.addErrback(lambda f: out.setdefault("error", f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    print(json.dumps(out))
    """
)


def test_group_commit_batches_isolates_withdraws_coalesces_and_drains(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "db.sqlite3")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "error" not in out, out["error"]
    # Withdrawn at its deadline while the thread was busy: it never began.
    assert out["late"]["started"] is False
    assert "did not answer within 0.2 s" in out["late"]["message"]
    assert out["first"] == "held"
    assert out["batch"] == ["k0", "k1", "k2", "k3", "ValueError"]
    # The held operation alone, then the five queued meanwhile together
    # (each again in a transaction of its own once one failed), then the
    # three queued before stop (in one batch or more: the thread was idle).
    assert out["sizes"][:2] == [1, 5]
    assert sum(out["sizes"]) == 1 + 5 + 3
    assert out["written"] == [{"x": 2}]
    assert out["stopped"] is True
    assert out["queued"] == [True, True, True]
    assert out["after_stop"] == "JobServiceUnavailable"
    keys = [k for k, _ in out["rows"]]
    assert keys == ["coalesced-x", "k0", "k1", "k2", "k3", "s0", "s1", "s2"]
    assert "undone" not in keys and "late" not in keys
