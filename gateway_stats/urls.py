"""URLs of the statistics app under ``/api/``: stats, the request log, the audit trail."""

from django.urls import path  # noqa: F401  (the views below add their paths)

urlpatterns: list = []  # type: ignore[type-arg]
