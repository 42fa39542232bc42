"""The Celery application (``celery -A apiforge worker`` / ``celery -A apiforge beat``)."""

import os

import orjson
from celery import Celery
from kombu.serialization import register

# JSON made by orjson: the usage consumer's messages (gateway_stats.usage_ingest) carry hundreds of rows each, and
# kombu's stdlib-json encoding of them was the usage thread's largest cost (about 7 us a row, measured with
# py-spy under load; orjson: 0.6). Still JSON, and only JSON: no pickle anywhere.
register("orjson", orjson.dumps, orjson.loads, content_type="application/x-orjson", content_encoding="binary")

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apiforge.settings")

app = Celery("apiforge")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.conf.imports = ("apiforge.tasks", "gateway_stats.tasks", "gateway_stats.rollups")
