"""APIForge project package: settings, urls, ASGI dispatch, Celery app, health."""

from apiforge.celery import app as celery_app

__all__ = ["celery_app"]
