"""
Submit a job inside a transaction, then die right after the commit, before
twistedlrp's own on-commit callback can tell the job service (the test of
the sweep). Prints the job's id; exits with status 7.

    python commit_then_die.py TESTSITE_DIR
"""

import os
import sys

sys.path.insert(0, sys.argv[1])
os.environ["DJANGO_SETTINGS_MODULE"] = "testsite.settings"

import django  # noqa: E402

django.setup()

from django.db import transaction  # noqa: E402

from testapp.jobs import read_note  # noqa: E402
from testapp.models import Note  # noqa: E402


def die():
    sys.stdout.flush()
    os._exit(7)


with transaction.atomic():
    # Registered first, so it runs before the job's own callback.
    transaction.on_commit(die)
    note = Note.objects.create(text="committed, then the process died")
    info = read_note.submit(note.id)
    sys.stdout.write(f"{info.id}\n")
