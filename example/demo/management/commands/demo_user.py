"""
``manage.py demo_user``: the demo's superuser, made once (``make run`` runs
it): user ``admin`` with a random password, printed when it is made.
"""

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the demo superuser 'admin' with a random password, once, and print it."

    def handle(self, *args, **options):
        users = get_user_model()
        if users.objects.filter(username="admin").exists():
            return
        password = secrets.token_urlsafe(9)
        users.objects.create_superuser("admin", "admin@example.com", password)
        self.stdout.write(
            f"Demo superuser for http://127.0.0.1:8000/admin/: admin / {password} "
            f"(shown once; change it with: manage.py changepassword admin)"
        )
