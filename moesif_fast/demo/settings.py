"""Settings of the example API. The environment chooses the collector and extra options:
MOESIF_DEMO_BASE_URI, MOESIF_DEMO_APPLICATION_ID, and MOESIF_DEMO_OPTIONS (a JSON object
merged into MOESIF_MIDDLEWARE, e.g. {"RING_DIR": "/tmp/x", "BATCH_SIZE": 50}); MOESIF_DEMO_CAPTURE=0
leaves the middleware out (the benchmarks' baseline)."""

import json
import os

SECRET_KEY = "moesif-fast-demo-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "moesif_fast.demo.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "moesif_fast"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
MIDDLEWARE = (["moesif_fast.middleware.MoesifMiddleware"]
              if os.environ.get("MOESIF_DEMO_CAPTURE", "1") != "0" else [])
LOGGING_CONFIG = None

MOESIF_MIDDLEWARE = {
    "APPLICATION_ID": os.environ.get("MOESIF_DEMO_APPLICATION_ID", "demo-application-id"),
    "BASE_URI": os.environ.get("MOESIF_DEMO_BASE_URI", "http://127.0.0.1:8085"),
    **json.loads(os.environ.get("MOESIF_DEMO_OPTIONS", "{}")),
}
