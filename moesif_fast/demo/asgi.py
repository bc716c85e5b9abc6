"""ASGI entry point of the example API (the standard Django layout), for ASGI workers."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

application = get_asgi_application()
