"""
--reload and templates: which changes reload the templates rather than
restart the server, how the supervisor tells the server, and Django's
loaders reset in a real (small) Django process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from twistedlrp.process.channel import Channel
from twistedlrp.reload import server_main
from twistedlrp.reload.supervisor import ReloadSupervisor, ServerProcess
from twistedlrp.reload.templates import describe_changes
from twistedlrp.reload.watcher import PollingWatcher, _scan


@pytest.fixture
def tree(tmp_path):
    """A root with an app's template directory, and one outside the root."""
    root = tmp_path / "site"
    templates = root / "app" / "templates"
    (templates / "app").mkdir(parents=True)
    (templates / "app" / "page.html").write_text("page\n")
    (templates / "app" / "mail.txt").write_text("mail\n")
    (templates / "app" / "helper.py").write_text("X = 1\n")
    (templates / "app" / ".page.html.swp").write_text("swap\n")
    (templates / "app" / "page.html~").write_text("backup\n")
    (root / "app" / "views.py").write_text("pass\n")
    (root / "notes.html").write_text("<p>notes</p>\n")
    outside = tmp_path / "lib" / "templates"
    outside.mkdir(parents=True)
    (outside / "base.html").write_text("base\n")
    return root, templates, outside


def _watcher(root, template_dirs=()):
    watcher = PollingWatcher(None, [str(root)], lambda paths: None)
    watcher.set_template_dirs([str(d) for d in template_dirs])
    return watcher


def test_what_is_a_template(tree):
    root, templates, outside = tree
    watcher = _watcher(root, [templates, outside])
    page = str(templates / "app" / "page.html")
    assert watcher.is_template(page)
    assert watcher.is_template(str(templates / "app" / "mail.txt"))  # any file, as runserver
    assert watcher.is_template(str(outside / "base.html"))
    # A .py file in a template directory is Python: it restarts.
    assert watcher.in_template_dir(str(templates / "app" / "helper.py"))
    assert not watcher.is_template(str(templates / "app" / "helper.py"))
    # Editors' swap and backup files are not watched at all.
    assert not watcher.in_template_dir(str(templates / "app" / ".page.html.swp"))
    assert not watcher.in_template_dir(str(templates / "app" / "page.html~"))
    # An .html file outside the template directories is no template, and not
    # a source file either.
    assert not watcher.is_template(str(root / "notes.html"))
    assert not watcher._accept_in_root(str(root / "notes.html"))
    assert watcher._accept_in_root(str(root / "app" / "views.py"))
    assert watcher._accept_in_root(page)
    # A file watched for another reason (an imported module, --config) restarts.
    config = templates / "app" / "lrp.toml"
    config.write_text("")
    watcher.add_files([str(config)])
    assert not watcher.is_template(str(config))
    # Only the directory outside the root needs a watch of its own.
    assert watcher.external_template_dirs() == [str(outside)]


def test_polling_scans_template_directories_not_other_html(tree):
    root, templates, outside = tree
    stamps = _scan([str(root)], set(), (str(templates), str(outside)))
    assert set(stamps) == {
        str(root / "app" / "views.py"),
        str(templates / "app" / "helper.py"),
        str(templates / "app" / "page.html"),
        str(templates / "app" / "mail.txt"),
        str(outside / "base.html"),
    }


def test_polling_reports_template_edits_but_not_a_newly_watched_directory(tree):
    root, templates, outside = tree
    reported = []
    watcher = PollingWatcher(None, [str(root)], reported.append)
    watcher.running = True
    watcher._compare(_scan([str(root)], set(), ()), set())
    # The server reports its template directories: their files are not new.
    watcher.set_template_dirs([str(templates), str(outside)])
    fresh_dirs = tuple(watcher._fresh_dirs)
    watcher._compare(_scan([str(root)], set(), watcher.template_dirs), set(), fresh_dirs)
    assert reported == []
    (outside / "base.html").write_text("base, longer\n")
    watcher._compare(_scan([str(root)], set(), watcher.template_dirs), set(), ())
    assert reported == [[str(outside / "base.html")]]


class _Channel:
    """The supervisor's end of a server's control channel: what it sends is kept."""

    def __init__(self):
        self.sent: list[dict] = []

    def send(self, message):
        self.sent.append(message)
        return True


def _server_process(state: str) -> ServerProcess:
    process = ServerProcess(None, 1)
    process.pid = 4242
    process.channel = _Channel()
    process.state = state
    return process


def test_a_serving_server_is_told_and_a_starting_one_once_it_runs():
    serving = _server_process("serving")
    serving.reload_templates(["/site/t/a.html"])
    assert serving.channel.sent == [{"event": "templates", "files": ["/site/t/a.html"]}]
    gated = _server_process("gated")
    gated.reload_templates(["/site/t/a.html"])
    assert gated.channel.sent == []
    gated.let_run()
    assert gated.channel.sent[0] == {"event": "go"}
    assert gated.channel.sent[1] == {
        "event": "templates",
        "files": ["/site/t/a.html"],
    }
    assert gated.templates_changed == set()


def test_a_server_that_closed_its_channel_is_not_an_error():
    ending = _server_process("serving")
    ending.channel = Channel(lambda message: None)  # never connected, or lost
    ending.reload_templates(["/site/t/a.html"])


def _supervisor(tree, current, pending=None):
    root, templates, outside = tree
    supervisor = ReloadSupervisor.__new__(ReloadSupervisor)
    supervisor.stopping = False
    supervisor.watcher = _watcher(root, [templates, outside])
    supervisor.current = current
    supervisor.pending = pending
    supervisor.spare = None
    supervisor.spawned = 0

    def spawn(spare=False):
        supervisor.spawned += 1

    supervisor._spawn = spawn
    return supervisor


@pytest.mark.parametrize(
    ("changed", "restarts"),
    [
        (["app/templates/app/page.html"], False),
        (["app/templates/app/page.html", "app/templates/app/mail.txt"], False),
        (["app/templates/app/helper.py"], True),  # a .py file in a template directory
        (["app/templates/app/page.html", "app/views.py"], True),  # both: restart
        (["app/views.py"], True),
    ],
)
def test_templates_only_reload_anything_else_restarts(tree, changed, restarts):
    root = tree[0]
    current = _server_process("serving")
    supervisor = _supervisor(tree, current)
    supervisor._changes = {str(root / path) for path in changed}
    supervisor._restart()
    assert supervisor.spawned == (1 if restarts else 0)
    told = current.channel.sent
    if restarts:
        assert told == []
    else:
        assert told == [{"event": "templates", "files": sorted(str(root / p) for p in changed)}]


def test_a_template_change_starts_a_server_when_none_runs(tree):
    supervisor = _supervisor(tree, None)
    supervisor._changes = {str(tree[0] / "app/templates/app/page.html")}
    supervisor._restart()
    assert supervisor.spawned == 1


def test_the_server_reads_messages_after_go_and_across_reads():
    ours, theirs = socket.socketpair()
    got = []
    reporter = server_main._Reporter(theirs.detach())
    try:
        ours.sendall(b'{"event": "go"}\n{"event": "templates", "files": ["a"]}\n{"ev')
        assert reporter.wait_for_word()
        channel = reporter.hand_over(got.append, None)
        assert got == [{"event": "templates", "files": ["a"]}]
        channel.dataReceived(b'ent": "templates", "files": ["b"]}\nnot json\n')
        assert got[1:] == [{"event": "templates", "files": ["b"]}]
    finally:
        ours.close()
        reporter.blocking.close()


def test_describe_changes():
    assert describe_changes(["/s/app/t/a.html"], "/s") == "app/t/a.html"
    assert describe_changes(["/s/b.html", "/s/a.html", "/x"], "/s") == "a.html and 2 more"
    assert describe_changes(["/other/a.html"], "/s") == "/other/a.html"


DJANGO_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import django
    from django.conf import settings

    here = sys.argv[1]
    settings.configure(
        INSTALLED_APPS=["app"],
        TEMPLATES=[{
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "DIRS": [os.path.join(here, "project_templates")],
            "APP_DIRS": True,
        }],
    )
    sys.path.insert(0, here)
    django.setup()
    from django.template.loader import render_to_string
    from twistedlrp.reload.templates import reset_loaders, template_directories

    print(sorted(template_directories()))
    page = os.path.join(here, "app", "templates", "page.html")
    print(render_to_string("page.html").strip())
    with open(page, "w") as f:
        f.write("v2")
    print(render_to_string("page.html").strip())  # the cached loader's copy
    reset_loaders()
    print(render_to_string("page.html").strip())
    """
)


def test_directories_and_reset_in_django(tmp_path):
    (tmp_path / "app" / "templates").mkdir(parents=True)
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "templates" / "page.html").write_text("v1")
    (tmp_path / "project_templates").mkdir()
    script = tmp_path / "script.py"
    script.write_text(DJANGO_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(
        sorted(
            [
                os.path.realpath(tmp_path / "app" / "templates"),
                os.path.realpath(tmp_path / "project_templates"),
            ]
        )
    )
    assert lines[1:] == ["v1", "v1", "v2"]
