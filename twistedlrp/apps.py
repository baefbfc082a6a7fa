"""The Django app that holds the job store (add ``twistedlrp`` to INSTALLED_APPS)."""

from django.apps import AppConfig


class TwistedLRPConfig(AppConfig):
    name = "twistedlrp"
    label = "twistedlrp"
    verbose_name = "twistedlrp jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.core import checks

        from twistedlrp.progress import check_settings

        checks.register(check_settings)
