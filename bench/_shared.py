"""What the benchmark scripts in this folder share."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def bench_site(scratch: Path) -> dict:
    """
    Migrate the bench site's SQLite database (the one C{/page} reads) in
    C{scratch}.

    @return: the environment a server of the bench site runs with.
    @raise subprocess.CalledProcessError: if the migration failed.
    """
    env = dict(
        os.environ,
        PYTHONPATH=str(BENCH_DIR),
        DJANGO_SETTINGS_MODULE="benchsite.settings",
        BENCH_DB=str(scratch / "bench.sqlite3"),
    )
    command = [sys.executable, "-m", "django", "migrate", "--noinput", "-v0"]
    subprocess.run(command, cwd=BENCH_DIR, env=env, check=True)
    return env


def free_port() -> int:
    """@return: a TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(lines: list[str], results: dict, json_path: str | None) -> int:
    """
    Write the report's C{lines} to standard output and, when C{json_path}
    is given, C{results} as JSON to that file.

    @return: the script's exit code.
    """
    sys.stdout.write("\n".join(lines) + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return 0


def _stat(pid: int, tid: int | None = None) -> list[str] | None:
    """@return: the fields of /proc/C{pid}/stat after the command name, or C{None} if gone."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    try:
        return Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None  # gone meanwhile


def descendants(leader: int) -> list[int]:
    """@return: the live processes below C{leader} (its children, theirs, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [leader]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def thread_cpu(leader: int) -> dict[str, float]:
    """
    @return: CPU seconds (user + system) used so far by C{leader} and the
        live processes below it: C{"main"} in their main threads (a Twisted
        server's reactors), C{"threads"} in their other threads, live or
        ended (C{"total"} minus C{"main"}), C{"total"} in all.
    """
    tick = os.sysconf("SC_CLK_TCK")
    main = total = 0.0
    for pid in [leader, *descendants(leader)]:
        process, thread = _stat(pid), _stat(pid, pid)
        if process is None or thread is None:
            continue
        total += (int(process[11]) + int(process[12])) / tick
        main += (int(thread[11]) + int(thread[12])) / tick
    return {"main": main, "threads": total - main, "total": total}
