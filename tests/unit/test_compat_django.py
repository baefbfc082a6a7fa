"""
The Django internals twistedlrp leans on (twistedlrp.compat's Django
section, and the resolver's lookups that boot builds ahead of requests):
each check fails, naming the internal, when a Django release changes it.
Django is set up in a child process, so that this pytest process keeps no
settings.
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, types
    import django
    from django.conf import settings

    urls = types.ModuleType("compat_urls")
    urls.urlpatterns = []
    sys.modules["compat_urls"] = urls
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        ROOT_URLCONF="compat_urls",
    )
    django.setup()
    from django.db import DatabaseError, connection
    from django.urls import get_resolver

    from twistedlrp import compat

    def changed(internal):
        return f"Django changed {internal}; twistedlrp.compat must follow"

    assert not compat.take_connection_errors(connection)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")
    except DatabaseError:
        pass
    assert compat.take_connection_errors(connection), changed("connection.errors_occurred")
    assert not compat.take_connection_errors(connection), changed("connection.errors_occurred")

    # twistedlrp.boot.load_root_urlconf builds reverse()'s lookups this way.
    resolver = get_resolver()
    assert not resolver._populated
    resolver.reverse_dict
    assert resolver._populated, changed("URLResolver.reverse_dict (it populates the resolver)")
    print("ok")
    """
)


def test_the_django_internals_are_as_relied_on():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
