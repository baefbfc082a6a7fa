"""
Watching files for the reload supervisor, as C{runserver} does: the C{.py} files
in the I{roots}, single I{files} (the modules imported, the config file), and
every file but editors' litter in the I{template directories}; by C{watchfiles},
else by polling every half second.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

from twisted.internet import defer, task, threads
from twisted.logger import Logger

log = Logger(namespace="twistedlrp.reload")

# Directories never worth watching inside a root.
IGNORED_DIRS = frozenset(
    ".git .hg .svn __pycache__ node_modules .venv venv .tox .nox .mypy_cache .pytest_cache "
    ".ruff_cache site-packages .lrp".split()
)
POLL_INTERVAL = 0.5
# Files in the roots whose change restarts the server.
SOURCE_SUFFIXES = (".py",)
# Names in template directories that are editors' swap, lock and backup
# files (as watchfiles' default filter has them), not templates.
_LITTER_PREFIXES = (".", "#", "flycheck_")
_LITTER_SUFFIXES = ("~", ".swp", ".swo", ".swx", "___", ".pyc", ".pyo")


def _litter(path: str) -> bool:
    name = os.path.basename(path)
    litter = name.startswith(_LITTER_PREFIXES) or name.endswith(_LITTER_SUFFIXES)
    return litter or f"{os.sep}__pycache__{os.sep}" in path


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def make_watcher(reactor, roots, on_change):
    """C{on_change(sorted paths)} runs in the reactor thread; polls without C{watchfiles}."""
    polling = os.environ.get("LRP_RELOAD_POLL", "") not in ("", "0")
    if not polling:
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            polling = True
    return (PollingWatcher if polling else EventWatcher)(reactor, roots, on_change)


class _BaseWatcher:
    def __init__(self, reactor, roots: Iterable[str], on_change: Callable[[list[str]], None]):
        self.reactor = reactor
        self.roots = sorted({os.path.realpath(r) for r in roots if os.path.isdir(r)})
        self.on_change = on_change
        self.files: set[str] = set()
        # Replaced whole: the watching threads read it.
        self.template_dirs: tuple[str, ...] = ()
        self.running = False

    def set_template_dirs(self, dirs: Iterable[str]) -> None:
        """Watch these template directories instead of the previous ones."""
        new = tuple(sorted({os.path.realpath(d) for d in dirs}))
        if new == self.template_dirs:
            return
        # Directories added or dropped: their files are neither new nor gone.
        moved = set(new) ^ set(self.template_dirs)
        self.template_dirs = new
        self._template_dirs_changed(moved)

    def external_template_dirs(self) -> list[str]:
        """The existing template directories outside the roots (and outside each other)."""
        dirs = [d for d in self.template_dirs if not _under(d, self.roots) and os.path.isdir(d)]
        return [d for d in dirs if not _under(d, [o for o in dirs if o != d])]

    def in_template_dir(self, path: str) -> bool:
        return _under(path, self.template_dirs) and not _litter(path)

    def is_template(self, path: str) -> bool:
        """@return: whether a change of C{path} reloads the templates (not the server)."""
        return self.in_template_dir(path) and not path.endswith(".py") and path not in self.files

    def add_files(self, paths: Iterable[str]) -> None:
        new = {p for p in map(os.path.realpath, paths) if p not in self.files and os.path.isfile(p)}
        if new:
            self.files |= new
            self._files_added(new)

    def _accept_in_root(self, path: str) -> bool:
        dirs = path.split(os.sep)[:-1]
        source = path.endswith(SOURCE_SUFFIXES) and not any(d in IGNORED_DIRS for d in dirs)
        return source or path in self.files or self.in_template_dir(path)

    def _report(self, paths: Iterable[str]) -> None:
        paths = sorted(set(paths))
        if paths and self.running:
            self.on_change(paths)

    def describe(self) -> str:
        return f"{', '.join(self.roots) or 'no directory'} ({self.name})"


class EventWatcher(_BaseWatcher):
    """Changes reported by the operating system through C{watchfiles}."""

    name = "watchfiles"

    def __init__(self, reactor, roots, on_change):
        super().__init__(reactor, roots, on_change)
        # "roots", "flat" (the single files' directories), "templates": the
        # paths watched, the event that stops their thread.
        self._threads: dict[str, tuple[tuple[str, ...], threading.Event]] = {}

    def start(self) -> None:
        self.running = True
        self._rewatch()

    def stop(self) -> defer.Deferred:
        self.running = False
        for _, stop in self._threads.values():
            stop.set()
        # Daemon threads, which notice within 50 ms (watchfiles' step): nothing waits for them.
        return defer.succeed(None)

    def _files_added(self, new) -> None:
        self._rewatch()

    def _template_dirs_changed(self, moved) -> None:
        self._rewatch()

    def _rewatch(self) -> None:
        if not self.running:
            return
        self._watch("roots", tuple(self.roots), True, self._accept_in_root)
        dirs = {os.path.dirname(f) for f in self.files if not _under(f, self.roots)}
        dirs = tuple(sorted(d for d in dirs if os.path.isdir(d)))
        self._watch("flat", dirs, False, self.files.__contains__)
        self._watch("templates", tuple(self.external_template_dirs()), True, self.in_template_dir)

    def _watch(self, key: str, paths: tuple[str, ...], recursive: bool, accept) -> None:
        watched, stop = self._threads.get(key, ((), None))
        if paths == watched:
            return
        if stop is not None:
            stop.set()
            del self._threads[key]
        if paths:
            stop = threading.Event()
            self._threads[key] = (paths, stop)
            threading.Thread(
                target=self._run,
                args=(list(paths), recursive, accept, stop),
                name="lrp-reload-watch",
                daemon=True,
            ).start()

    def _run(self, paths, recursive, accept, stop) -> None:
        import watchfiles

        try:
            for changes in watchfiles.watch(
                *paths,
                watch_filter=lambda change, path: accept(path),
                recursive=recursive,
                stop_event=stop,
                rust_timeout=1000,
                raise_interrupt=False,
                ignore_permission_denied=True,
            ):
                if stop.is_set():
                    return
                self.reactor.callFromThread(self._report, [path for _, path in changes])
        except Exception as e:
            if not stop.is_set():
                self.reactor.callFromThread(
                    log.error,
                    "Watching {paths} failed ({error}); changes there are not seen",
                    paths=", ".join(paths),
                    error=f"{type(e).__name__}: {e}",
                )


class PollingWatcher(_BaseWatcher):
    """Modification times compared every L{POLL_INTERVAL} seconds, in a thread."""

    name = "polling"

    def __init__(self, reactor, roots, on_change):
        super().__init__(reactor, roots, on_change)
        self._snapshot: dict[str, tuple] | None = None
        self._fresh: set[str] = set()
        self._fresh_dirs: set[str] = set()
        self._loop = task.LoopingCall(self._poll)
        self._loop.clock = reactor

    def start(self) -> None:
        self.running = True
        self._loop.start(POLL_INTERVAL, now=True)

    def stop(self) -> defer.Deferred:
        self.running = False
        if self._loop.running:
            self._loop.stop()
        return defer.succeed(None)

    def _files_added(self, new) -> None:
        # A newly watched file is compared from its next scan on.
        self._fresh |= new

    def _template_dirs_changed(self, moved) -> None:
        # So are the files of a template directory watched or dropped now.
        self._fresh_dirs |= moved

    def _poll(self) -> defer.Deferred:
        # The loop waits for the scan: the next starts at a later interval.
        fresh, self._fresh = self._fresh, set()
        fresh_dirs, self._fresh_dirs = tuple(self._fresh_dirs), set()
        roots, files = list(self.roots), set(self.files)
        pool = self.reactor.getThreadPool()
        d = threads.deferToThreadPool(self.reactor, pool, _scan, roots, files, self.template_dirs)
        d.addCallback(self._compare, fresh, fresh_dirs)
        d.addErrback(lambda f: log.failure("Polling for changes failed", f))
        return d

    def _compare(self, snapshot: dict, fresh: set[str], fresh_dirs: tuple[str, ...] = ()) -> None:
        old, self._snapshot = self._snapshot, snapshot
        if old is None:
            return
        changed = [p for p, stamp in snapshot.items() if old.get(p, stamp) != stamp]
        changed += [
            p for p in snapshot if p not in old and p not in fresh and not _under(p, fresh_dirs)
        ]
        changed += [p for p in old if p not in snapshot and not _under(p, fresh_dirs)]
        self._report(changed)


def _scan(roots: list[str], files: set[str], template_dirs=()) -> dict[str, tuple]:
    stamps = {}

    def stamp(path):
        try:
            st = os.stat(path)
        except OSError:
            return
        stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)

    def walk(root, ignored, wanted):
        for directory, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ignored]
            for path in (os.path.join(directory, name) for name in filenames):
                if path not in stamps and wanted(path):
                    stamp(path)

    for root in roots:
        walk(root, IGNORED_DIRS, lambda path: path.endswith(SOURCE_SUFFIXES))
    for root in template_dirs:
        walk(root, ("__pycache__",), lambda path: not _litter(path))
    for path in files - stamps.keys():
        stamp(path)
    return stamps
