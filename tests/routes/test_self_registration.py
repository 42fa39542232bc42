"""A service registering itself with its own API key: allowed only for the routes the key names explicitly, and
only toward targets in ROUTE_TARGET_ALLOWLIST (empty: registration by key is off)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from accounts.models import User
from gateway_stats.models import AuditEvent
from keys.services import key_revoke
from proxy.models import Route
from tests.routes.conftest import ALLOWED_TARGET, key_client, route_body
from tests.routes.factories import RouteFactory, RouteTargetFactory

pytestmark = pytest.mark.django_db

ALLOWLIST = ["orders-1.svc.internal", "billing.svc.internal:9000", "10.20.0.0/16", "[2001:db8::7]:8443"]

MakeKey = Callable[..., Any]


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
@pytest.mark.parametrize("header", ["bearer", "x-api-key", "api-key"])
def test_a_key_naming_the_route_registers_it_toward_an_allowlisted_target(
    service_key: MakeKey, user: User, header: str
) -> None:
    key = service_key("orders")
    client = key_client(key.secret, header=header, REMOTE_ADDR="203.0.113.9")

    created = client.post("/api/register", route_body(ttl_s=15), format="json")

    assert created.status_code == 201, created.content
    route = Route.objects.get(name="orders")
    assert route.registered_by_key_id == key.pk
    event = AuditEvent.objects.get(action="route.create")
    assert (event.actor_id, event.ip_address, event.changes["key_prefix"]) == (user.pk, "203.0.113.9", key.prefix)

    again = client.post("/api/register", route_body(ttl_s=15), format="json")
    assert again.status_code == 200, again.content
    assert again.json()["id"] == route.pk


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
@pytest.mark.parametrize(
    "url",
    [
        "http://10.20.3.4:8080",  # a CIDR covers IP literals
        "https://billing.svc.internal:9000/v2",  # host:port
        "https://[2001:db8::7]:8443",
        "http://ORDERS-1.svc.internal.:81",  # a bare host name allows any port; case and a trailing dot ignored
    ],
)
def test_targets_matching_the_allowlist_are_accepted(service_key: MakeKey, url: str) -> None:
    client = key_client(service_key("orders").secret)

    answer = client.post("/api/register", route_body(targets=[{"url": url}]), format="json")

    assert answer.status_code == 201, answer.content


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",  # loopback: outside every entry
        "http://10.21.0.1",  # next to the CIDR
        "http://billing.svc.internal:9001",  # host:port names one port
        "http://billing.svc.internal",  # port 80 is not 9000
        "http://evil-orders-1.svc.internal",
        "http://169.254.169.254/latest",  # cloud metadata
        "http://[::ffff:127.0.0.1]:8080",  # loopback, IPv4-mapped
    ],
)
def test_a_target_outside_the_allowlist_is_refused(service_key: MakeKey, url: str) -> None:
    client = key_client(service_key("orders").secret)

    answer = client.post("/api/register", route_body(targets=[{"url": ALLOWED_TARGET}, {"url": url}]), format="json")

    assert answer.status_code == 403, answer.content
    assert answer.json()["code"] == "route_target_not_allowed"
    assert "ROUTE_TARGET_ALLOWLIST" in answer.json()["detail"]
    assert not Route.objects.exists()
    assert not AuditEvent.objects.exists()


@override_settings(ROUTE_TARGET_ALLOWLIST=[])
def test_with_an_empty_allowlist_registration_by_key_is_refused_with_a_clear_403(service_key: MakeKey) -> None:
    client = key_client(service_key("orders").secret)

    answer = client.post("/api/register", route_body(), format="json")

    assert answer.status_code == 403
    assert answer.json()["code"] == "route_registration_by_key_disabled"
    assert "ROUTE_TARGET_ALLOWLIST is empty" in answer.json()["detail"]
    assert not Route.objects.exists()


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
def test_a_key_with_an_empty_allowed_routes_may_call_every_route_but_register_none(service_key: MakeKey) -> None:
    client = key_client(service_key().secret)

    answer = client.post("/api/register", route_body(), format="json")

    assert answer.status_code == 403
    assert "does not name the route" in answer.json()["detail"]
    assert not Route.objects.exists()
    RouteFactory(name="orders")
    assert client.get("/api/routes").json()["count"] == 0  # naming is what makes a route a key's own


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
def test_a_key_cannot_register_or_take_over_another_routes_name(service_key: MakeKey) -> None:
    other = RouteFactory(name="billing", timeout_s=12)
    RouteTargetFactory(route=other, url="http://billing.svc.internal:9000")
    client = key_client(service_key("orders").secret)

    new = client.post("/api/register", route_body("payments"), format="json")
    taken = client.post("/api/register", route_body("billing"), format="json")

    assert (new.status_code, taken.status_code) == (403, 403)
    other.refresh_from_db()
    assert other.timeout_s == 12
    assert not Route.objects.filter(name="payments").exists()


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
def test_a_key_reads_changes_renews_and_removes_only_the_routes_it_names(service_key: MakeKey) -> None:
    mine = RouteFactory(name="orders", ttl_s=20)
    RouteTargetFactory(route=mine, url=ALLOWED_TARGET)
    theirs = RouteFactory(name="billing", ttl_s=20)
    RouteTargetFactory(route=theirs, url="http://billing.svc.internal:9000")
    client = key_client(service_key("orders").secret)

    assert [r["name"] for r in client.get("/api/routes").json()["results"]] == ["orders"]
    assert client.get(f"/api/routes/{mine.pk}/").json()["targets"][0]["url"] == ALLOWED_TARGET  # internals shown
    for answer in (
        client.get(f"/api/routes/{theirs.pk}/"),
        client.patch(f"/api/routes/{theirs.pk}/", {"timeout_s": 1}, format="json"),
        client.post(f"/api/routes/{theirs.pk}/heartbeat"),
        client.delete(f"/api/routes/{theirs.pk}/"),
        client.delete("/api/unregister", {"name": "billing"}, format="json"),
    ):
        assert answer.status_code == 404, answer.content
    assert client.patch(f"/api/routes/{mine.pk}/", {"timeout_s": 2}, format="json").status_code == 200
    assert client.post(f"/api/routes/{mine.pk}/heartbeat").status_code == 200
    assert client.delete("/api/unregister?name=orders").status_code == 204
    assert list(Route.objects.values_list("name", flat=True)) == ["billing"]


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
def test_a_key_cannot_rename_its_route_to_a_name_it_does_not_hold(service_key: MakeKey) -> None:
    mine = RouteFactory(name="orders")
    RouteTargetFactory(route=mine, url=ALLOWED_TARGET)
    client = key_client(service_key("orders").secret)

    answer = client.patch(f"/api/routes/{mine.pk}/", {"name": "billing"}, format="json")

    assert answer.status_code == 403
    mine.refresh_from_db()
    assert mine.name == "orders"


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
def test_a_key_cannot_patch_its_route_toward_a_target_outside_the_allowlist(service_key: MakeKey) -> None:
    mine = RouteFactory(name="orders")
    RouteTargetFactory(route=mine, url=ALLOWED_TARGET)
    client = key_client(service_key("orders").secret)

    answer = client.patch(f"/api/routes/{mine.pk}/", {"targets": [{"url": "http://127.0.0.1:5432"}]}, format="json")

    assert answer.status_code == 403
    assert list(mine.targets.values_list("url", flat=True)) == [ALLOWED_TARGET]


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
def test_a_key_cannot_bring_back_a_route_an_operator_deactivated(service_key: MakeKey) -> None:
    route = RouteFactory(name="orders", is_active=False, deactivated_reason="operator", ttl_s=30)
    RouteTargetFactory(route=route, url=ALLOWED_TARGET)
    client = key_client(service_key("orders").secret)

    forced = client.post("/api/register", route_body(ttl_s=30, is_active=True), format="json")
    again = client.post("/api/register", route_body(ttl_s=30), format="json")
    beat = client.post(f"/api/routes/{route.pk}/heartbeat")

    assert forced.status_code == 403
    assert forced.json()["code"] == "route_deactivated_by_operator"
    assert (again.status_code, again.json()["is_active"]) == (200, False)
    assert (beat.status_code, beat.json()["is_active"]) == (200, False)
    route.refresh_from_db()
    assert (route.is_active, route.deactivated_reason) == (False, "operator")
    assert route.lease_expires_at is not None
    assert route.lease_expires_at > timezone.now()


@override_settings(ROUTE_TARGET_ALLOWLIST=ALLOWLIST)
def test_a_key_may_switch_its_route_off_and_on_again(service_key: MakeKey) -> None:
    route = RouteFactory(name="orders")
    RouteTargetFactory(route=route, url=ALLOWED_TARGET)
    client = key_client(service_key("orders").secret)

    off = client.patch(f"/api/routes/{route.pk}/", {"is_active": False}, format="json").json()
    on = client.patch(f"/api/routes/{route.pk}/", {"is_active": True}, format="json").json()

    assert (off["is_active"], off["deactivated_reason"]) == (False, "key")
    assert (on["is_active"], on["deactivated_reason"]) == (True, "")


def test_an_unknown_key_is_a_401_and_a_revoked_one_a_403(service_key: MakeKey) -> None:
    key = service_key("orders")
    revoked = service_key("orders")
    key_revoke(key=revoked)

    unknown = key_client("afk-" + "x" * 43).post("/api/register", route_body(), format="json")
    refused = key_client(revoked.secret).post("/api/register", route_body(), format="json")
    fine = key_client(key.secret).get("/api/routes")

    assert unknown.status_code == 401
    assert unknown["WWW-Authenticate"].startswith("Bearer")
    assert refused.status_code == 403
    assert "revoked" in refused.json()["detail"]
    assert fine.status_code == 200


def test_a_key_allowlisted_for_some_addresses_is_refused_from_others(service_key: MakeKey) -> None:
    key = service_key("orders", ip_allowlist=["192.0.2.0/24"])

    inside = key_client(key.secret, REMOTE_ADDR="192.0.2.10").get("/api/routes")
    outside = key_client(key.secret, REMOTE_ADDR="198.51.100.1").get("/api/routes")

    assert (inside.status_code, outside.status_code) == (200, 403)
