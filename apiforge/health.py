"""Liveness and readiness: ``/health`` and ``/health/ready``.

Readiness checks each configured dependency (database, cache, broker, channel
layer) and reports ``ok``, ``error`` or ``disabled`` (not configured: the
embedded default). Any ``error`` makes the answer 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

logger = logging.getLogger(__name__)

Check = Callable[[], str]


def _database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


def _cache() -> str:
    if not settings.REDIS_URL:
        return "disabled"
    cache.set("health:probe", "1", timeout=5)
    return "ok" if cache.get("health:probe") == "1" else "error"


def _broker() -> str:
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return "disabled"
    from apiforge.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=1)
    return "ok"


def _channel_layer() -> str:
    if not settings.REDIS_URL:
        return "disabled"
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return "disabled"

    async def roundtrip() -> bool:
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "health.probe"})
        message = await asyncio.wait_for(layer.receive(channel), timeout=1)
        return bool(message.get("type") == "health.probe")

    return "ok" if asyncio.run(roundtrip()) else "error"


CHECKS: dict[str, Check] = {
    "database": _database,
    "cache": _cache,
    "broker": _broker,
    "channel_layer": _channel_layer,
}


def _run(name: str, check: Check) -> str:
    try:
        return check()
    except Exception:
        logger.warning("readiness check %s failed", name, exc_info=True)
        return "error"


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """Liveness: the process serves."""
    return JsonResponse({"status": "ok"})


@require_GET
def health_ready(request: HttpRequest) -> JsonResponse:
    """Readiness: every configured dependency answers."""
    checks = {name: _run(name, check) for name, check in CHECKS.items()}
    ok = all(value != "error" for value in checks.values())
    return JsonResponse({"status": "ok" if ok else "error", "checks": checks}, status=200 if ok else 503)
