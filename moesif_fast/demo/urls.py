"""Routes of the example API."""

from django.urls import path

from . import views

urlpatterns = [
    path("api/items", views.items),
    path("api/echo", views.echo),
    path("api/text", views.text),
    path("api/stream", views.stream),
    path("api/status/<int:code>", views.status),
    path("api/slow", views.slow),
    path("api/database", views.database),
]
