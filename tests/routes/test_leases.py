"""Leased registration: a route registered with ttl_s is deactivated by the beat task once its lease runs out
(kept and shown as lease-expired, not deleted) and comes back with a heartbeat or a re-register.

Time is moved by writing ``lease_expires_at`` into the past, never by sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from gateway_stats.models import AuditEvent
from proxy.models import Route
from proxy.tasks import route_leases_expire
from tests.gateway.echo_target import EchoTarget
from tests.live_server import LiveServer
from tests.routes.conftest import route_body
from tests.routes.factories import RouteFactory, RouteTargetFactory

pytestmark = pytest.mark.django_db


def _expire(name: str, seconds_ago: float = 1.0) -> None:
    Route.objects.filter(name=name).update(lease_expires_at=timezone.now() - timedelta(seconds=seconds_ago))


def _sweep() -> list[str]:
    return list(route_leases_expire.apply().result)


def test_a_route_registered_with_a_ttl_gets_a_lease_of_that_length(staff_client: APIClient) -> None:
    before = timezone.now()
    staff_client.post("/api/register", route_body(ttl_s=20), format="json")
    after = timezone.now()

    lease = Route.objects.get(name="orders").lease_expires_at
    assert lease is not None
    assert before + timedelta(seconds=20) <= lease <= after + timedelta(seconds=20)


def test_the_task_deactivates_expired_leases_only_and_the_api_shows_them(staff_client: APIClient) -> None:
    RouteFactory(name="orders", ttl_s=10)
    RouteFactory(name="fresh", ttl_s=10, lease_expires_at=timezone.now() + timedelta(seconds=10))
    RouteFactory(name="unleased")
    RouteFactory(name="asleep", ttl_s=10, is_active=False, deactivated_reason="operator")
    _expire("orders")
    _expire("asleep")

    assert _sweep() == ["orders"]
    assert _sweep() == []  # idempotent

    states = dict(Route.objects.values_list("name", "deactivated_reason"))
    assert states == {"orders": "lease_expired", "fresh": "", "unleased": "", "asleep": "operator"}
    shown = staff_client.get(f"/api/routes/{Route.objects.get(name='orders').pk}/").json()
    assert (shown["is_active"], shown["lease_expired"], shown["deactivated_reason"]) == (False, True, "lease_expired")
    event = AuditEvent.objects.get(action="route.lease_expired")
    assert (event.actor, event.object_repr, event.changes["is_active"]) == (None, "orders", [True, False])


def test_a_heartbeat_renews_the_lease_and_brings_back_a_lease_expired_route(staff_client: APIClient) -> None:
    route = RouteFactory(name="orders", ttl_s=10)
    RouteTargetFactory(route=route)
    _expire("orders", seconds_ago=30)
    _sweep()

    before = timezone.now()
    answer = staff_client.post(f"/api/routes/{route.pk}/heartbeat")

    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert (body["is_active"], body["lease_expired"], body["deactivated_reason"]) == (True, False, "")
    route.refresh_from_db()
    assert route.lease_expires_at is not None
    assert route.lease_expires_at >= before + timedelta(seconds=10)
    assert _sweep() == []


def test_a_re_register_renews_the_lease_and_brings_back_a_lease_expired_route(staff_client: APIClient) -> None:
    staff_client.post("/api/register", route_body(ttl_s=10), format="json")
    _expire("orders", seconds_ago=30)
    _sweep()

    again = staff_client.post("/api/register", route_body(ttl_s=10), format="json")

    assert again.status_code == 200
    assert (again.json()["is_active"], again.json()["lease_expired"]) == (True, False)


def test_a_heartbeat_without_a_ttl_is_a_400_on_ttl_s(staff_client: APIClient) -> None:
    route = RouteFactory(name="orders")

    answer = staff_client.post(f"/api/routes/{route.pk}/heartbeat")

    assert answer.status_code == 400
    assert set(answer.json()["fields"]) == {"ttl_s"}
    assert "no lease" in answer.json()["fields"]["ttl_s"][0]


def test_changing_or_clearing_the_ttl_restarts_or_ends_the_lease(staff_client: APIClient) -> None:
    route = RouteFactory(name="orders", ttl_s=10, lease_expires_at=timezone.now() + timedelta(seconds=10))
    RouteTargetFactory(route=route)

    longer = staff_client.patch(f"/api/routes/{route.pk}/", {"ttl_s": 600}, format="json").json()
    cleared = staff_client.patch(f"/api/routes/{route.pk}/", {"ttl_s": None}, format="json").json()

    assert longer["lease_expires_at"] > (timezone.now() + timedelta(seconds=500)).isoformat().replace("+00:00", "Z")
    assert (cleared["ttl_s"], cleared["lease_expires_at"], cleared["lease_expired"]) == (None, None, False)


def test_staff_activating_a_lease_expired_route_gives_it_a_fresh_lease(staff_client: APIClient) -> None:
    route = RouteFactory(name="orders", ttl_s=10)
    RouteTargetFactory(route=route)
    _expire("orders", seconds_ago=60)
    _sweep()

    body = staff_client.patch(f"/api/routes/{route.pk}/", {"is_active": True}, format="json").json()

    assert (body["is_active"], body["lease_expired"]) == (True, False)
    assert _sweep() == []


# --- end to end: a service registers itself, clients call it through /gw/, the lease runs out and comes back ----


@pytest.fixture
def echo() -> Any:
    target = EchoTarget("orders").start()
    yield target
    target.stop()


@override_settings(ROUTE_TARGET_ALLOWLIST=["127.0.0.1/32"])
def test_a_self_registered_route_serves_until_its_lease_runs_out_and_again_after_a_heartbeat(
    live_gateway: LiveServer, echo: EchoTarget, service_key: Callable[..., Any]
) -> None:
    key = service_key("orders")
    auth = {"Authorization": f"Bearer {key.secret}"}

    def call() -> httpx.Response:
        return httpx.get(live_gateway.url("/gw/orders/7"), headers=auth, timeout=10)

    registered = httpx.post(
        live_gateway.url("/api/register"),
        json=route_body(ttl_s=30, targets=[{"url": echo.root_url}]),
        headers=auth,
        timeout=10,
    )
    assert registered.status_code == 201, registered.text
    served = call()
    assert served.status_code == 200, served.text
    assert served.json()["path"] == "/7"

    _expire("orders")
    assert _sweep() == ["orders"]
    assert call().status_code == 404

    beat = httpx.post(live_gateway.url(f"/api/routes/{registered.json()['id']}/heartbeat"), headers=auth, timeout=10)
    assert beat.status_code == 200, beat.text
    assert call().status_code == 200
