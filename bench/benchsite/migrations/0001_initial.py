import datetime

from django.db import migrations, models


def articles(apps, schema_editor):
    # 500 rows, always the same: every server reads the same page.
    Article = apps.get_model("benchsite", "Article")
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    Article.objects.bulk_create(
        Article(
            title=f"Article number {i}: a title of a usual length",
            author=f"Author {i % 37}",
            published=start + datetime.timedelta(hours=7 * i),
            views=(i * 7919) % 100_000,
            rating=(i * 31 % 50) / 10,
            summary="A paragraph of text that stands for an article's summary, & such. " * 3,
        )
        for i in range(500)
    )


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Article",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("title", models.CharField(max_length=200)),
                ("author", models.CharField(max_length=100)),
                ("published", models.DateTimeField(db_index=True)),
                ("views", models.IntegerField()),
                ("rating", models.FloatField()),
                ("summary", models.TextField()),
            ],
        ),
        migrations.RunPython(articles, migrations.RunPython.noop),
    ]
