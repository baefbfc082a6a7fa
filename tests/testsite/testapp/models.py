from django.db import models


class Note(models.Model):
    """A row a view writes in the transaction that submits a job reading it."""

    text = models.CharField(max_length=200)
