"""The route registry over HTTP, as staff: the seed's endpoints with and without a trailing slash, register as
update, unregister by body and by query, what each caller sees, audit rows, and who may not write."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from accounts.models import User
from gateway_stats.models import AuditEvent
from proxy.models import Route, RouteTarget
from tests.factories import ApiKeyFactory, UserFactory
from tests.routes.conftest import ALLOWED_TARGET, jwt_client, route_body
from tests.routes.factories import RouteFactory, RouteTargetFactory

pytestmark = pytest.mark.django_db

ANSWER_FIELDS = {
    "id",
    "name",
    "path",
    "version",
    "methods",
    "hosts",
    "auth",
    "balancer",
    "strip_path",
    "path_rewrite",
    "timeout_s",
    "retries",
    "retry_non_idempotent",
    "max_body_bytes",
    "request_headers",
    "response_headers",
    "fallback",
    "deprecated",
    "sunset_at",
    "health_check",
    "breaker_failure_threshold",
    "breaker_cooldown_s",
    "breaker_half_open_requests",
    "ttl_s",
    "lease_expires_at",
    "lease_expired",
    "rate_limit_rpm",
    "is_active",
    "deactivated_reason",
    "targets",
    "created_at",
    "updated_at",
}


def _register(client: APIClient, body: dict[str, Any], *, slash: bool = False) -> Any:
    return client.post("/api/register/" if slash else "/api/register", body, format="json")


# --- CRUD through the seed's paths -------------------------------------------------------------------------


@pytest.mark.parametrize("slash", [False, True], ids=["no-slash", "slash"])
def test_staff_registers_lists_reads_changes_renews_and_unregisters_a_route(
    staff_client: APIClient, slash: bool
) -> None:
    end = "/" if slash else ""
    created = _register(staff_client, route_body(ttl_s=30, methods=["GET", "POST"]), slash=slash)
    assert created.status_code == 201, created.content
    route = created.json()
    assert set(route) == ANSWER_FIELDS
    assert (route["name"], route["path"], route["methods"], route["is_active"]) == (
        "orders",
        "/orders",
        ["GET", "POST"],
        True,
    )
    assert route["targets"] == [
        {"id": route["targets"][0]["id"], "url": ALLOWED_TARGET, "weight": 1, "health": "healthy"}
    ]
    assert route["lease_expires_at"] is not None
    assert route["lease_expired"] is False

    listed = staff_client.get(f"/api/routes{end}")
    assert listed.status_code == 200
    assert listed.json()["count"] == 1
    assert listed.json()["results"][0]["id"] == route["id"]

    detail = f"/api/routes/{route['id']}" + ("/" if slash else "")
    assert staff_client.get(detail).json()["name"] == "orders"

    changed = staff_client.patch(detail, {"timeout_s": 5, "deprecated": True}, format="json")
    assert changed.status_code == 200, changed.content
    assert (changed.json()["timeout_s"], changed.json()["deprecated"]) == (5.0, True)
    assert changed.json()["targets"] == route["targets"]  # not given: kept

    renewed = staff_client.post(f"/api/routes/{route['id']}/heartbeat{end}")
    assert renewed.status_code == 200, renewed.content
    assert renewed.json()["lease_expires_at"] >= route["lease_expires_at"]

    gone = staff_client.delete(detail)
    assert gone.status_code == 204
    assert not Route.objects.exists()
    assert not RouteTarget.objects.exists()


def test_a_route_is_unregistered_by_name_in_the_body(staff_client: APIClient) -> None:
    RouteFactory(name="orders")

    answer = staff_client.delete("/api/unregister", {"name": "orders"}, format="json")

    assert answer.status_code == 204, answer.content
    assert not Route.objects.filter(name="orders").exists()


@pytest.mark.parametrize("url", ["/api/unregister?name=orders", "/api/unregister/?name=orders"])
def test_a_route_is_unregistered_by_name_in_the_query(staff_client: APIClient, url: str) -> None:
    RouteFactory(name="orders")

    answer = staff_client.delete(url)

    assert answer.status_code == 204, answer.content
    assert not Route.objects.filter(name="orders").exists()


def test_unregistering_an_unknown_name_is_a_404_and_without_a_name_a_400(staff_client: APIClient) -> None:
    RouteFactory(name="orders")

    unknown = staff_client.delete("/api/unregister", {"name": "nope"}, format="json")
    nameless = staff_client.delete("/api/unregister")
    conflicting = staff_client.delete("/api/unregister?name=other", {"name": "orders"}, format="json")

    assert unknown.status_code == 404
    assert "nope" in unknown.json()["detail"]
    assert nameless.status_code == 400
    assert set(nameless.json()["fields"]) == {"name"}
    assert conflicting.status_code == 400
    assert Route.objects.filter(name="orders").exists()


# --- register as update -------------------------------------------------------------------------------------


def test_registering_the_same_name_again_updates_the_route_and_replaces_its_targets(staff_client: APIClient) -> None:
    first = _register(
        staff_client,
        route_body(
            targets=[{"url": "http://a.internal:8080", "weight": 1}, {"url": "http://b.internal:8080", "weight": 2}],
            timeout_s=7,
            fallback={"status": 503, "body": "down"},
        ),
    ).json()
    kept_id = next(t["id"] for t in first["targets"] if t["url"] == "http://b.internal:8080")

    again = _register(
        staff_client,
        route_body(
            path="/orders/",
            targets=[{"url": "http://b.internal:8080", "weight": 5}, {"url": "http://c.internal:8080"}],
        ),
    )

    assert again.status_code == 200, again.content
    body = again.json()
    assert body["id"] == first["id"]
    assert body["path"] == "/orders"  # the trailing slash is dropped
    assert [(t["url"], t["weight"]) for t in body["targets"]] == [
        ("http://b.internal:8080", 5),
        ("http://c.internal:8080", 1),
    ]
    assert body["targets"][0]["id"] == kept_id  # the target that stayed kept its id (its breaker and health)
    # The body describes the whole route: what it leaves out takes its default.
    assert (body["timeout_s"], body["fallback"]) == (30.0, {})
    assert Route.objects.count() == 1
    assert RouteTarget.objects.count() == 2


def test_re_registering_keeps_a_staff_deactivation_and_a_kept_targets_drain(staff_client: APIClient) -> None:
    route = _register(staff_client, route_body()).json()
    staff_client.patch(f"/api/routes/{route['id']}/", {"is_active": False}, format="json")
    RouteTarget.objects.update(health="drained")

    again = _register(staff_client, route_body()).json()

    assert (again["is_active"], again["deactivated_reason"]) == (False, "operator")
    assert again["targets"][0]["health"] == "drained"


# --- audit --------------------------------------------------------------------------------------------------


def test_every_write_is_audited_with_the_actor_and_address(staff_client: APIClient, staff: User) -> None:
    route = _register(staff_client, route_body(ttl_s=30)).json()
    _register(staff_client, route_body(ttl_s=30, timeout_s=9))
    staff_client.patch(f"/api/routes/{route['id']}/", {"retries": 3}, format="json")
    # A plain lease renewal is not audited (services beat every few seconds); one that reactivates a route is.
    staff_client.post(f"/api/routes/{route['id']}/heartbeat")
    staff_client.delete("/api/unregister", {"name": "orders"}, format="json")

    events = list(AuditEvent.objects.order_by("id"))
    assert [e.action for e in events] == [
        "route.create",
        "route.register",
        "route.update",
        "route.delete",
    ]
    assert {(e.actor_id, e.ip_address, e.object_type, e.object_id) for e in events} == {
        (staff.pk, "198.51.100.7", "proxy.route", str(route["id"]))
    }
    assert events[0].changes["targets"] == [{"url": ALLOWED_TARGET, "weight": 1, "health": "healthy"}]
    assert events[1].changes["timeout_s"] == [30.0, 9.0]
    assert events[2].changes == {"retries": [1, 3]}


def test_header_values_are_masked_in_the_audit_trail(staff_client: APIClient) -> None:
    secret = "target-token-value-0042"
    route = _register(staff_client, route_body(request_headers={"set": {"X-Target-Token": secret}})).json()
    staff_client.patch(
        f"/api/routes/{route['id']}/", {"request_headers": {"set": {"X-Target-Token": secret + "x"}}}, format="json"
    )

    events = list(AuditEvent.objects.order_by("id"))
    assert events[0].changes["request_headers"] == {"set": {"X-Target-Token": "***"}}
    assert events[1].changes == {"request_headers": "values changed"}
    assert secret not in str([e.changes for e in events])


# --- who sees what ------------------------------------------------------------------------------------------


def test_an_ordinary_user_cannot_write_routes(user_client: APIClient) -> None:
    route = RouteFactory(name="orders", ttl_s=30)
    RouteTargetFactory(route=route)

    answers = [
        _register(user_client, route_body("new-one")),
        _register(user_client, route_body("orders")),
        user_client.patch(f"/api/routes/{route.pk}/", {"timeout_s": 3}, format="json"),
        user_client.delete(f"/api/routes/{route.pk}/"),
        user_client.post(f"/api/routes/{route.pk}/heartbeat"),
        user_client.delete("/api/unregister", {"name": "orders"}, format="json"),
    ]

    assert [a.status_code for a in answers] == [403] * 6
    assert Route.objects.filter(name="orders", timeout_s=30.0).exists()
    assert not AuditEvent.objects.exists()


def test_staff_without_the_route_permissions_is_an_ordinary_user(db: None) -> None:
    client = jwt_client(UserFactory(staff=True))

    assert _register(client, route_body()).status_code == 403


def test_staff_with_change_but_not_add_may_re_register_but_not_create(db: None) -> None:
    from django.contrib.auth.models import Permission

    member = UserFactory(staff=True)
    member.user_permissions.set(Permission.objects.filter(codename="change_route"))
    RouteFactory(name="orders")
    client = jwt_client(member)

    assert _register(client, route_body("orders")).status_code == 200
    refused = _register(client, route_body("new-one"))
    assert refused.status_code == 403
    assert "proxy.add_route" in refused.json()["detail"]


def test_anonymous_callers_are_asked_to_authenticate(db: None) -> None:
    answer = APIClient().get("/api/routes")

    assert answer.status_code == 401
    assert answer["WWW-Authenticate"].startswith("Bearer")


def test_an_ordinary_user_sees_the_active_routes_their_keys_may_call_without_internals(
    user: User, user_client: APIClient
) -> None:
    RouteTargetFactory(route=RouteFactory(name="orders"))
    RouteFactory(name="billing")
    RouteFactory(name="asleep", is_active=False)
    ApiKeyFactory(owner=user, allowed_routes=["orders", "asleep"])

    listed = user_client.get("/api/routes").json()

    assert [row["name"] for row in listed["results"]] == ["orders"]
    assert "targets" not in listed["results"][0]
    assert "request_headers" not in listed["results"][0]


def test_filters_and_search_narrow_the_list(staff_client: APIClient) -> None:
    RouteFactory(name="orders", version="v2", auth="jwt")
    RouteFactory(name="orders-old", deprecated=True, is_active=False)
    RouteFactory(name="billing", auth="none")

    def names(query: str) -> list[str]:
        answer = staff_client.get(f"/api/routes?{query}")
        assert answer.status_code == 200, answer.content
        return [row["name"] for row in answer.json()["results"]]

    assert names("is_active=false") == ["orders-old"]
    assert names("auth=jwt") == ["orders"]
    assert names("version=v2") == ["orders"]
    assert names("deprecated=true") == ["orders-old"]
    assert names("search=orders") == ["orders", "orders-old"]
    assert staff_client.get("/api/routes?is_active=maybe").status_code == 400
    assert staff_client.get("/api/routes?auth=magic").status_code == 400


def test_the_route_list_takes_as_many_queries_for_30_routes_as_for_3(staff_client: APIClient) -> None:
    def make(count: int) -> None:
        for _ in range(count):
            RouteTargetFactory.create_batch(2, route=RouteFactory())

    def queries() -> int:
        with CaptureQueriesContext(connection) as context:
            assert staff_client.get("/api/routes?page_size=50").status_code == 200
        return len(context.captured_queries)

    make(3)
    few = queries()
    make(27)
    assert queries() == few
