"""A task module that only a client process imports (the server never does)."""

try:
    from django.tasks import task
except ImportError:
    from django_tasks import task


@task
def client_only(x):
    return x
