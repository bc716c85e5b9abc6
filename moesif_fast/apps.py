"""The Django app: listing "moesif_fast" in INSTALLED_APPS runs the MOESIF_MIDDLEWARE system
checks in `manage.py check` and at `runserver` start (Django never imports middleware then)."""

from django.apps import AppConfig


class MoesifFastConfig(AppConfig):
    name = "moesif_fast"
    verbose_name = "Moesif API analytics"

    def ready(self) -> None:
        from . import settings  # noqa: F401  (registers the system check)
