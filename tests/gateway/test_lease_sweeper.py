"""The embedded default sweeps expired route leases itself (no broker, so no beat)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from django.utils import timezone

from proxy.models import Route
from tests.gateway.conftest import RouteMaker
from tests.gateway.echo_target import EchoTarget


def test_without_a_broker_the_server_deactivates_expired_leases(
    settings: Any, live_server_factory: Any, route_make: RouteMaker, echo: EchoTarget
) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = True  # no broker: what `make run` has
    settings.ROUTE_LEASE_SWEEP_S = 0.1
    expired = route_make(
        "gone", "/gone", [echo.root_url], ttl_s=30, lease_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    running = route_make(
        "alive", "/alive", [echo.root_url], ttl_s=30, lease_expires_at=timezone.now() + dt.timedelta(minutes=5)
    )
    from apiforge.asgi import application

    server = live_server_factory(application)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        expired.refresh_from_db()
        if not expired.is_active:
            break
        time.sleep(0.05)
    server.stop()  # before the test's database access ends (the sweep runs every 0.1 s)
    assert (expired.is_active, expired.deactivated_reason) == (False, "lease_expired")
    assert Route.objects.get(pk=running.pk).is_active


def test_with_a_broker_the_server_leaves_the_sweep_to_beat(
    settings: Any, live_server_factory: Any, route_make: RouteMaker, echo: EchoTarget
) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.ROUTE_LEASE_SWEEP_S = 0.05
    expired = route_make(
        "gone", "/gone", [echo.root_url], ttl_s=30, lease_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    from apiforge.asgi import application

    server = live_server_factory(application)
    time.sleep(0.5)
    server.stop()
    expired.refresh_from_db()
    assert expired.is_active  # beat's job (proxy.route_leases_expire), not the web process's
