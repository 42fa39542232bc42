"""The Celery application (``celery -A apiforge worker`` / ``celery -A apiforge beat``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apiforge.settings")

app = Celery("apiforge")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.conf.imports = ("apiforge.tasks", "gateway_stats.tasks", "gateway_stats.rollups")
