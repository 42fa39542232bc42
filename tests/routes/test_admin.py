"""The route admin: changelist and change page render with inline targets and their live state, the form
validates through the services, writes and actions are audited and reach the route's targets."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import User
from gateway_stats.models import AuditEvent
from proxy.models import Route, RouteTarget
from tests.factories import UserFactory
from tests.routes.factories import RouteFactory, RouteTargetFactory

pytestmark = pytest.mark.django_db

LIST = "/admin/proxy/route/"
ADD = "/admin/proxy/route/add/"


@pytest.fixture
def admin_user() -> User:
    return UserFactory(superuser=True)


@pytest.fixture
def admin_client(admin_user: User) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def _get_ok(client: Client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


def _queries(action: Callable[[], Any]) -> int:
    with CaptureQueriesContext(connection) as context:
        action()
    return len(context.captured_queries)


def _form(targets: list[dict[str, Any]], prefix_ids: list[int] | None = None, **overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": "orders",
        "path": "/orders",
        "version": "",
        "methods": "GET, post",
        "hosts": "",
        "auth": "key",
        "balancer": "round_robin",
        "strip_path": "on",
        "path_rewrite": "{}",
        "timeout_s": "30",
        "retries": "1",
        "max_body_bytes": "",
        "request_headers": "{}",
        "response_headers": "{}",
        "fallback": "{}",
        "sunset_at_0": "",
        "sunset_at_1": "",
        "health_check": "{}",
        "breaker_failure_threshold": "5",
        "breaker_cooldown_s": "30",
        "breaker_half_open_requests": "1",
        "ttl_s": "",
        "rate_limit_rpm": "",
        "is_active": "on",
        "targets-TOTAL_FORMS": str(len(targets)),
        "targets-INITIAL_FORMS": str(len(prefix_ids or [])),
        "targets-MIN_NUM_FORMS": "1",
        "targets-MAX_NUM_FORMS": "1000",
    }
    for index, target in enumerate(targets):
        form[f"targets-{index}-url"] = target["url"]
        form[f"targets-{index}-weight"] = str(target.get("weight", 1))
        form[f"targets-{index}-health"] = target.get("health", "healthy")
        if prefix_ids and index < len(prefix_ids):
            form[f"targets-{index}-id"] = str(prefix_ids[index])
            form[f"targets-{index}-route"] = target["route"]
        if target.get("delete"):
            form[f"targets-{index}-DELETE"] = "on"
    form.update(overrides)
    return form


def test_the_changelist_renders_every_column_without_n_plus_one(admin_client: Client) -> None:
    leased = RouteFactory(name="leased", ttl_s=30, lease_expires_at=timezone.now() + timedelta(seconds=20))
    RouteTargetFactory.create_batch(2, route=leased)
    RouteFactory(
        name="gone",
        ttl_s=30,
        is_active=False,
        deactivated_reason="lease_expired",
        lease_expires_at=timezone.now() - timedelta(seconds=5),
        deprecated=True,
    )

    html = _get_ok(admin_client, LIST)
    assert "leased" in html
    assert "s left of 30 s" in html
    assert "expired (deactivated)" in html
    few = _queries(lambda: _get_ok(admin_client, LIST))
    for _ in range(10):
        RouteTargetFactory.create_batch(3, route=RouteFactory())
    assert _queries(lambda: _get_ok(admin_client, LIST)) == few

    for query in ("?lease=expired", "?lease=running", "?lease=none", "?is_active__exact=0", "?q=leased"):
        _get_ok(admin_client, LIST + query)


def test_the_change_page_shows_the_inline_targets_with_their_live_health_and_breaker(admin_client: Client) -> None:
    route = RouteFactory(name="orders")
    RouteTargetFactory(route=route, url="http://orders-1.internal:8080", weight=3)
    RouteTargetFactory(route=route, url="http://orders-2.internal:8080", health="drained")

    html = _get_ok(admin_client, f"/admin/proxy/route/{route.pk}/change/")

    assert "http://orders-1.internal:8080" in html
    assert "http://orders-2.internal:8080" in html
    assert "live health" in html
    assert "breaker" in html
    assert "closed" in html  # no failures yet: every breaker is closed
    _get_ok(admin_client, ADD)


def test_a_route_added_in_the_admin_goes_through_the_services(admin_client: Client, admin_user: User) -> None:
    answer = admin_client.post(
        ADD, _form([{"url": "http://orders-1.internal:8080", "weight": 2}], ttl_s="20"), REMOTE_ADDR="192.0.2.5"
    )

    assert answer.status_code == 302, answer.content.decode()[:3000]
    route = Route.objects.get(name="orders")
    assert route.methods == ["GET", "POST"]
    assert route.lease_expires_at is not None  # the service started the lease
    assert list(route.targets.values_list("url", "weight")) == [("http://orders-1.internal:8080", 2)]
    event = AuditEvent.objects.get(action="route.create")
    assert (event.actor_id, event.ip_address) == (admin_user.pk, "192.0.2.5")


def test_the_admin_form_refuses_what_the_api_refuses(admin_client: Client) -> None:
    RouteFactory(name="first", path="/orders")

    answers = [
        admin_client.post(ADD, _form([{"url": "http://a.internal"}], path="/admin")),
        admin_client.post(ADD, _form([{"url": "http://a.internal"}])),  # first's path
        admin_client.post(ADD, _form([{"url": "ftp://a.internal"}], path="/x")),
        admin_client.post(ADD, _form([{"url": "http://a.internal", "weight": 0}], path="/x")),
        admin_client.post(
            ADD, _form([{"url": "http://a.internal"}], path="/x", request_headers='{"set": {"Host": "x"}}')
        ),
        admin_client.post(ADD, _form([], path="/x")),
    ]

    assert [a.status_code for a in answers] == [200] * len(answers)  # the form again, with errors
    assert "platform" in answers[0].content.decode()
    assert "first" in answers[1].content.decode()
    assert "http:// or https://" in answers[2].content.decode()
    assert "weight above 0" in answers[3].content.decode()
    assert "gateway&#x27;s own headers" in answers[4].content.decode()
    assert list(Route.objects.values_list("name", flat=True)) == ["first"]
    assert not AuditEvent.objects.filter(object_type="proxy.route").exists()


def test_changing_a_route_and_its_inline_targets_keeps_the_ids_of_the_targets_that_stay(admin_client: Client) -> None:
    route = RouteFactory(name="orders")
    kept = RouteTargetFactory(route=route, url="http://a.internal:8080")
    dropped = RouteTargetFactory(route=route, url="http://b.internal:8080")
    targets = [
        {"url": kept.url, "weight": 4, "route": str(route.pk)},
        {"url": dropped.url, "route": str(route.pk), "delete": True},
        {"url": "http://c.internal:8080"},
    ]

    answer = admin_client.post(
        f"/admin/proxy/route/{route.pk}/change/", _form(targets, prefix_ids=[kept.pk, dropped.pk], timeout_s="5")
    )

    assert answer.status_code == 302, answer.content.decode()[:3000]
    route.refresh_from_db()
    assert route.timeout_s == 5.0
    assert list(route.targets.order_by("pk").values_list("pk", "url", "weight")) == [
        (kept.pk, "http://a.internal:8080", 4),
        (RouteTarget.objects.get(url="http://c.internal:8080").pk, "http://c.internal:8080", 1),
    ]
    assert AuditEvent.objects.get(action="route.update").changes["timeout_s"] == [30.0, 5.0]


def test_the_actions_activate_deactivate_drain_and_restore_through_the_services(admin_client: Client) -> None:
    route = RouteFactory(name="orders", ttl_s=30)
    RouteTargetFactory(route=route, url="http://a.internal")
    RouteTargetFactory(route=route, url="http://b.internal", health="unhealthy")

    def act(action: str) -> None:
        answer = admin_client.post(LIST, {"action": action, "_selected_action": [str(route.pk)]})
        assert answer.status_code == 302, answer.content.decode()[:2000]
        route.refresh_from_db()

    act("deactivate_routes")
    assert (route.is_active, route.deactivated_reason) == (False, "operator")
    act("activate_routes")
    assert (route.is_active, route.deactivated_reason) == (True, "")
    assert route.lease_expires_at is not None  # activated with a ttl_s: a fresh lease
    act("drain_targets")
    assert sorted(route.targets.values_list("health", flat=True)) == ["drained", "drained"]
    act("restore_targets")
    assert sorted(route.targets.values_list("health", flat=True)) == ["healthy", "healthy"]
    assert list(
        AuditEvent.objects.filter(object_type="proxy.route").order_by("id").values_list("action", flat=True)
    ) == [
        "route.deactivate",
        "route.activate",
        "route.targets_drain",
        "route.targets_restore",
    ]


def test_deleting_in_the_admin_is_audited(admin_client: Client) -> None:
    route = RouteFactory(name="orders")
    RouteTargetFactory(route=route)

    answer = admin_client.post(f"/admin/proxy/route/{route.pk}/delete/", {"post": "yes"})

    assert answer.status_code == 302
    assert not Route.objects.exists()
    assert AuditEvent.objects.get(action="route.delete").object_repr == "orders"
