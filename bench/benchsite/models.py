from django.db import models


class Article(models.Model):
    """What /page lists, 20 at a time."""

    id = models.BigAutoField(primary_key=True)
    title = models.CharField(max_length=200)
    author = models.CharField(max_length=100)
    published = models.DateTimeField(db_index=True)
    views = models.IntegerField()
    rating = models.FloatField()
    summary = models.TextField()
