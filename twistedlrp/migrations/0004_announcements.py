# Jobs stored through a site's own transaction, not yet taken by the job service.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("twistedlrp", "0003_schedules"),
    ]

    operations = [
        migrations.CreateModel(
            name="Announcement",
            fields=[
                ("job", models.UUIDField(primary_key=True, serialize=False)),
            ],
        ),
    ]
