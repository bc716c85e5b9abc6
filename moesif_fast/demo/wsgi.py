"""WSGI entry point of the example API (the standard Django layout)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

application = get_wsgi_application()
