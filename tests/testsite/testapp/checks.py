import os

from django.core import checks


@checks.register()
def env_check(app_configs, **kwargs):
    if os.environ.get("LRP_TEST_CHECK_ERROR"):
        return [checks.Error("the test asked for a check error", id="testapp.E001")]
    return []
