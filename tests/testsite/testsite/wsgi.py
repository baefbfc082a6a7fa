"""The test site's WSGI application, wrapped in wsgiref.validate so every
request the tests send checks the environ and the response for PEP 3333."""

import os
from wsgiref.validate import validator

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testsite.settings")
_validated = validator(get_wsgi_application())


def application(environ, start_response):
    result = _validated(environ, start_response)
    # The validator's wrapper hides the Django response; pass on whether it
    # streams, so the server's buffered path is what the tests exercise.
    result.streaming = getattr(result.original_iterator, "streaming", None)
    return result
