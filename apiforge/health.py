"""Liveness and readiness: ``/health`` and ``/health/ready``.

Readiness checks each dependency (database, cache, broker, channel layer, and
the event bus's ZeroMQ socket when ``EVENTS_ZMQ_PUB`` is set) and reports
``ok``, ``error`` or ``disabled``. ``disabled`` means the embedded default is
in use (in-process cache or channel layer, Celery tasks run in-process):
nothing outside the process to check. Any ``error`` makes the answer 503.
Each check is bounded by short timeouts, so a dead dependency costs about a
second, not a hung probe.

When some circuit breaker is not closed or some route target is unhealthy
(as the answering worker sees them: the state is shared by every worker), the
answer also has ``"breakers"``: one object per such key (``dep:<id>`` for a
model deployment, ``rt:<id>`` for a route target) with its ``state``
(closed | open | half_open), ``health`` (healthy | unhealthy | unknown), and
while open ``retry_in_s``. Upstreams being down does not make the gateway
unready: ``status`` stays about the gateway's own dependencies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from apiforge.errors import json_error
from proxy.edge.breaker import breaker_view, breakers_not_closed, health_unhealthy_keys, health_view

logger = logging.getLogger(__name__)

Check = Callable[[], str]
TIMEOUT_S = 1.0

_IN_PROCESS_CHANNEL_LAYERS = {"channels.layers.InMemoryChannelLayer"}


def _database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


def _cache() -> str:
    if isinstance(caches["default"], LocMemCache | DummyCache):
        return "disabled"
    key = f"health:probe:{uuid.uuid4().hex}"
    cache.set(key, "1", timeout=5)
    try:
        return "ok" if cache.get(key) == "1" else "error"
    finally:
        cache.delete(key)


def _broker() -> str:
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return "disabled"
    from apiforge.celery import app

    # The URL is read from settings on every probe (Celery caches its own config).
    with app.connection_for_write(
        settings.CELERY_BROKER_URL,
        connect_timeout=TIMEOUT_S,
        transport_options={"socket_connect_timeout": TIMEOUT_S, "socket_timeout": TIMEOUT_S},
    ) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=TIMEOUT_S)
    return "ok"


def _channel_layer() -> str:
    config = settings.CHANNEL_LAYERS.get("default")
    if not config or config.get("BACKEND") in _IN_PROCESS_CHANNEL_LAYERS:
        return "disabled"
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

    # A private layer instance on a private event loop: its connection pool is
    # closed afterwards and never shared with the server's consumers.
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)

    async def roundtrip() -> bool:
        try:
            channel = await layer.new_channel()
            await layer.send(channel, {"type": "health.probe"})
            message = await layer.receive(channel)
            return bool(message.get("type") == "health.probe")
        finally:
            close_pools = getattr(layer, "close_pools", None)
            if close_pools is not None:
                await close_pools()

    async def bounded() -> bool:
        return await asyncio.wait_for(roundtrip(), timeout=2 * TIMEOUT_S)

    return "ok" if asyncio.run(bounded()) else "error"


def _zmq() -> str:
    from gateway_stats.events import bus

    # The event bus's PUB socket (gateway_stats/events.py): bound (or connected) by its publisher thread.
    return bus.zmq_status(timeout=TIMEOUT_S)


CHECKS: dict[str, Check] = {
    "database": _database,
    "cache": _cache,
    "broker": _broker,
    "channel_layer": _channel_layer,
}


def _checks() -> dict[str, Check]:
    """``CHECKS``, plus ``zmq`` when ``EVENTS_ZMQ_PUB`` is set (absent from the answer otherwise)."""
    return {**CHECKS, "zmq": _zmq} if settings.EVENTS_ZMQ_PUB else CHECKS


def _run(name: str, check: Check) -> str:
    try:
        return check()
    except Exception:
        logger.warning("readiness check %s failed", name, exc_info=True)
        return "error"


def breakers_detail() -> dict[str, dict[str, Any]]:
    """The breakers that are not closed and the targets that are unhealthy, by key (this worker's view)."""
    now = time.time()
    keys = {view.key for view in breakers_not_closed()} | set(health_unhealthy_keys())
    detail: dict[str, dict[str, Any]] = {}
    for key in sorted(keys):
        view = breaker_view(key)
        item: dict[str, Any] = {"state": view.state, "health": health_view(key), "trips": view.trips}
        if view.open_until:
            item["retry_in_s"] = max(0, math.ceil(view.open_until - now))
        detail[key] = item
    return detail


def _get_only(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """Like ``require_GET``, but the 405 is the project's JSON error."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest) -> HttpResponse:
        if request.method not in {"GET", "HEAD"}:
            response = json_error(405, f'Method "{request.method}" not allowed.', "method_not_allowed")
            response["Allow"] = "GET, HEAD"
            return response
        return view(request)

    return wrapper


@csrf_exempt  # probes never change anything; a POST gets the JSON 405, not an HTML CSRF page
@_get_only
def health(request: HttpRequest) -> HttpResponse:
    """Liveness: the process serves."""
    return JsonResponse({"status": "ok"})


@csrf_exempt
@_get_only
def health_ready(request: HttpRequest) -> HttpResponse:
    """Readiness: every configured dependency answers."""
    checks = {name: _run(name, check) for name, check in _checks().items()}
    ok = all(value != "error" for value in checks.values())
    answer: dict[str, Any] = {"status": "ok" if ok else "error", "checks": checks}
    if breakers := breakers_detail():
        answer["breakers"] = breakers
    return JsonResponse(answer, status=200 if ok else 503)
