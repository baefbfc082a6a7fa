"""The test site's WSGI application, wrapped in wsgiref.validate so every
request the tests send checks the environ and the response for PEP 3333."""

import os
from wsgiref.validate import validator

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testsite.settings")
application = validator(get_wsgi_application())
