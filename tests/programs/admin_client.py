"""
Django's test client on the admin of a running server's database (settings
testsite.admin_settings; the job service reached through LRP_STATE_DIR).
Arguments: the id of a finished job, the id of a running job. Prints one
JSON line of what the pages and actions showed.
"""

import json
import sys

import django

django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.contrib.messages import get_messages  # noqa: E402
from django.test import Client  # noqa: E402

from twistedlrp.models import Job  # noqa: E402

finished_id, running_id = sys.argv[1:3]
out = {}
client = Client()
client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
changelist = "/admin/twistedlrp/job/"


def page(path):
    response = client.get(path)
    return {"status": response.status_code, "html": response.content.decode()}


def action(name, ids, **extra):
    response = client.post(
        changelist, {"action": name, "_selected_action": ids, **extra}, follow=False
    )
    return {
        "status": response.status_code,
        "html": response.content.decode(),
        "messages": [str(m) for m in get_messages(response.wsgi_request)],
    }


out["list"] = page(changelist)
out["change_finished"] = page(f"{changelist}{finished_id}/change/")
out["change_running"] = page(f"{changelist}{running_id}/change/")
out["delete_running_page"] = page(f"{changelist}{running_id}/delete/")
out["delete_running"] = action("delete_selected", [running_id, finished_id])
out["after_refused_delete"] = sorted(
    str(i)
    for i in Job.objects.filter(id__in=[running_id, finished_id]).values_list("id", flat=True)
)
before = set(Job.objects.values_list("id", flat=True))
out["run_again"] = action("run_again", [finished_id])
new = Job.objects.exclude(id__in=before)
out["new_jobs"] = [{"id": str(j.id), "name": j.name, "args": j.args} for j in new]
out["delete_confirm"] = action("delete_selected", [finished_id])
out["delete_finished"] = action("delete_selected", [finished_id], post="yes")
out["finished_left"] = Job.objects.filter(id=finished_id).exists()
out["schedules"] = page("/admin/twistedlrp/schedule/")
sys.stdout.write(json.dumps(out) + "\n")
