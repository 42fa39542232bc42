"""Auth endpoints (filled by the accounts issue)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
