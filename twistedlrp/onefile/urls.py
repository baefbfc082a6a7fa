"""The root URLconf of a site given with ``--app``: the progress widget's, then its own."""

from django.core.exceptions import ImproperlyConfigured
from django.urls import include, path

from twistedlrp.onefile import site as _site

_loaded = _site.loaded()
if _loaded is None:
    raise ImproperlyConfigured(
        "twistedlrp.onefile.urls serves the site given with twistd lrp --app, "
        "which this process has not imported"
    )

urlpatterns = [path("lrp/", include("twistedlrp.urls")), *_loaded.urlpatterns]
