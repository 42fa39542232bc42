"""Bad input to the registry: each case is a 400 whose ``fields`` names the field at fault, and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from gateway_stats.models import AuditEvent
from proxy.models import Route
from tests.routes.conftest import route_body
from tests.routes.factories import RouteFactory, RouteTargetFactory

pytestmark = pytest.mark.django_db


def _targets(*urls: str, weight: int = 1) -> list[dict[str, Any]]:
    return [{"url": url, "weight": weight} for url in urls]


def _names(fields: dict[str, Any], field: str) -> bool:
    """Whether the error names ``field`` or a path inside it (``methods.1``, ``targets.0.url``)."""
    return any(name == field or name.startswith(f"{field}.") for name in fields)


CASES: list[tuple[str, dict[str, Any], str]] = [
    # auth and balancer
    ("unknown auth", {"auth": "basic"}, "auth"),
    ("unknown balancer", {"balancer": "random"}, "balancer"),
    # targets
    ("no targets", {"targets": []}, "targets"),
    ("targets missing", {"targets": None}, "targets"),
    ("ftp target", {"targets": _targets("ftp://files.internal")}, "targets.0.url"),
    ("schemeless target", {"targets": _targets("orders.internal:8080")}, "targets.0.url"),
    ("not a url", {"targets": _targets("http://")}, "targets.0.url"),
    ("userinfo", {"targets": _targets("http://user:pw@orders.internal")}, "targets.0.url"),
    ("fragment", {"targets": _targets("http://orders.internal/#top")}, "targets.0.url"),
    ("query", {"targets": _targets("http://orders.internal/?a=1")}, "targets.0.url"),
    ("space in url", {"targets": _targets("http://orders internal")}, "targets.0.url"),
    ("bad port", {"targets": _targets("http://orders.internal:99999")}, "targets.0.url"),
    ("bad host", {"targets": _targets("http://-orders-.internal")}, "targets.0.url"),
    ("dot segment", {"targets": _targets("http://orders.internal/a/../b")}, "targets.0.url"),
    ("negative weight", {"targets": _targets("http://a.internal", weight=-1)}, "targets.0.weight"),
    ("all weights zero", {"targets": _targets("http://a.internal", "http://b.internal", weight=0)}, "targets"),
    (
        "duplicate targets",
        {"targets": _targets("http://a.internal:8080", "HTTP://A.internal:8080/")},
        "targets.1.url",
    ),
    ("unknown target field", {"targets": [{"url": "http://a.internal", "wieght": 2}]}, "targets.0.wieght"),
    ("unknown target health", {"targets": [{"url": "http://a.internal", "health": "sick"}]}, "targets.0.health"),
    # methods and hosts
    ("unknown method", {"methods": ["GET", "FETCH"]}, "methods"),
    ("lower-case method", {"methods": ["get"]}, "methods"),
    ("host with port", {"hosts": ["api.example.com:8443"]}, "hosts"),
    ("host with scheme", {"hosts": ["https://api.example.com"]}, "hosts"),
    ("host with space", {"hosts": ["api example.com"]}, "hosts"),
    # path
    ("relative path", {"path": "orders"}, "path"),
    ("dot dot", {"path": "/orders/../admin"}, "path"),
    ("double slash", {"path": "/orders//x"}, "path"),
    ("question mark", {"path": "/orders?x=1"}, "path"),
    ("hash", {"path": "/orders#x"}, "path"),
    ("whitespace", {"path": "/or ders"}, "path"),
    ("control char", {"path": "/orders\x07"}, "path"),
    ("percent escape", {"path": "/orders%2F"}, "path"),
    ("platform /admin", {"path": "/admin"}, "path"),
    ("platform /api below", {"path": "/api/orders"}, "path"),
    ("platform /GW any case", {"path": "/GW/x"}, "path"),
    ("platform /v1", {"path": "/v1/chat"}, "path"),
    ("platform /static", {"path": "/static"}, "path"),
    # version
    ("version with slash", {"version": "v2/beta"}, "version"),
    ("version too long", {"version": "v" * 40}, "version"),
    ("version with space", {"version": "v 2"}, "version"),
    # header transforms
    ("headers not an object", {"request_headers": ["X-A"]}, "request_headers"),
    ("unknown transform key", {"request_headers": {"append": {"X-A": "1"}}}, "request_headers"),
    ("bad header name", {"request_headers": {"add": {"X A": "1"}}}, "request_headers"),
    ("header value with CR/LF", {"request_headers": {"set": {"X-A": "1\r\nX-B: 2"}}}, "request_headers"),
    ("header value with NUL", {"response_headers": {"add": {"X-A": "a\u0001b\u0000"}}}, "response_headers"),
    ("header value not a string", {"request_headers": {"add": {"X-A": 5}}}, "request_headers"),
    ("header value not latin-1", {"response_headers": {"set": {"X-A": "snowman ☃"}}}, "response_headers"),
    ("sets authorization", {"request_headers": {"set": {"Authorization": "Bearer x"}}}, "request_headers"),
    ("adds x-api-key", {"request_headers": {"add": {"X-Api-Key": "x"}}}, "request_headers"),
    ("adds api-key", {"request_headers": {"add": {"api-key": "x"}}}, "request_headers"),
    ("sets host", {"request_headers": {"set": {"Host": "internal"}}}, "request_headers"),
    ("sets content-length", {"response_headers": {"set": {"Content-Length": "1"}}}, "response_headers"),
    ("removes transfer-encoding", {"response_headers": {"remove": ["Transfer-Encoding"]}}, "response_headers"),
    ("sets connection", {"request_headers": {"set": {"Connection": "close"}}}, "request_headers"),
    ("spoofs the user", {"request_headers": {"set": {"X-Authenticated-User": "root"}}}, "request_headers"),
    ("remove not a list", {"request_headers": {"remove": "X-A"}}, "request_headers"),
    # path rewrite
    ("rewrite not an object", {"path_rewrite": "/x"}, "path_rewrite"),
    ("template without slash", {"path_rewrite": {"template": "api/{path}"}}, "path_rewrite"),
    ("regex does not compile", {"path_rewrite": {"regex": "^/(", "replacement": "/x"}}, "path_rewrite"),
    ("regex without replacement", {"path_rewrite": {"regex": "^/a"}}, "path_rewrite"),
    ("template and regex", {"path_rewrite": {"template": "/a", "regex": "^/b", "replacement": "/c"}}, "path_rewrite"),
    ("replacement names a missing group", {"path_rewrite": {"regex": "^/(a)", "replacement": r"/\2"}}, "path_rewrite"),
    # fallback
    ("fallback status too low", {"fallback": {"status": 99, "body": "x"}}, "fallback"),
    ("fallback status too high", {"fallback": {"status": 600}}, "fallback"),
    ("fallback status missing", {"fallback": {"body": "x"}}, "fallback"),
    ("fallback status a string", {"fallback": {"status": "503"}}, "fallback"),
    ("fallback headers not an object", {"fallback": {"status": 503, "headers": ["X"]}}, "fallback"),
    ("fallback header with LF", {"fallback": {"status": 503, "headers": {"X-A": "a\nb"}}}, "fallback"),
    ("fallback unknown key", {"fallback": {"status": 503, "code": 1}}, "fallback"),
    # health check
    ("health check without path", {"health_check": {"interval_s": 5}}, "health_check"),
    ("health check relative path", {"health_check": {"path": "healthz"}}, "health_check"),
    ("health check zero interval", {"health_check": {"path": "/h", "interval_s": 0}}, "health_check"),
    ("health check negative timeout", {"health_check": {"path": "/h", "timeout_s": -1}}, "health_check"),
    ("health check zero healthy", {"health_check": {"path": "/h", "healthy": 0}}, "health_check"),
    ("health check zero unhealthy", {"health_check": {"path": "/h", "unhealthy": 0}}, "health_check"),
    ("health check unknown key", {"health_check": {"path": "/h", "method": "HEAD"}}, "health_check"),
    # numbers
    ("zero timeout", {"timeout_s": 0}, "timeout_s"),
    ("negative timeout", {"timeout_s": -5}, "timeout_s"),
    ("retries above 10", {"retries": 11}, "retries"),
    ("negative retries", {"retries": -1}, "retries"),
    ("ttl below 5", {"ttl_s": 4}, "ttl_s"),
    ("breaker threshold 0", {"breaker_failure_threshold": 0}, "breaker_failure_threshold"),
    ("negative cooldown", {"breaker_cooldown_s": -1}, "breaker_cooldown_s"),
    ("zero probes", {"breaker_half_open_requests": 0}, "breaker_half_open_requests"),
    ("zero body limit", {"max_body_bytes": 0}, "max_body_bytes"),
    ("zero rpm", {"rate_limit_rpm": 0}, "rate_limit_rpm"),
    # names and unknown fields
    ("name not a slug", {"name": "orders v2"}, "name"),
    ("unknown field", {"ttl": 30}, "ttl"),
    ("read-only field", {"lease_expires_at": "2030-01-01T00:00:00Z"}, "lease_expires_at"),
]


@pytest.mark.parametrize(("overrides", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_registration_is_a_400_naming_the_field(
    staff_client: APIClient, overrides: dict[str, Any], field: str
) -> None:
    body = route_body(**overrides)
    if body.get("targets") is None:
        del body["targets"]

    answer = staff_client.post("/api/register", body, format="json")

    assert answer.status_code == 400, answer.content
    error = answer.json()
    assert error["code"] == "invalid"
    assert _names(error["fields"], field), error["fields"]
    assert not Route.objects.exists()
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize(
    ("existing", "overrides"),
    [
        ({"path": "/orders"}, {"path": "/orders/"}),  # the trailing slash is ignored
        ({"path": "/orders", "hosts": ["api.example.com"]}, {"hosts": []}),  # empty hosts = any host
        ({"path": "/orders", "hosts": ["a.example.com", "b.example.com"]}, {"hosts": ["B.example.com"]}),
        ({"path": "/orders", "version": "v2"}, {"version": "v2"}),
    ],
    ids=["same path", "any host overlaps", "shared host", "same version"],
)
def test_another_routes_path_version_and_host_is_a_400_on_path(
    staff_client: APIClient, existing: dict[str, Any], overrides: dict[str, Any]
) -> None:
    RouteFactory(name="first", **existing)

    answer = staff_client.post("/api/register", route_body("second", **{"path": "/orders", **overrides}), format="json")

    assert answer.status_code == 400, answer.content
    assert set(answer.json()["fields"]) == {"path"}
    assert "first" in answer.json()["fields"]["path"][0]


@pytest.mark.parametrize(
    ("existing", "overrides"),
    [
        ({"path": "/orders", "version": "v1"}, {"version": "v2"}),
        ({"path": "/orders", "hosts": ["a.example.com"]}, {"hosts": ["b.example.com"]}),
        ({"path": "/orders"}, {"path": "/orders/items"}),
    ],
    ids=["other version", "other host", "longer path"],
)
def test_routes_that_differ_in_version_host_or_path_may_coexist(
    staff_client: APIClient, existing: dict[str, Any], overrides: dict[str, Any]
) -> None:
    RouteFactory(name="first", **existing)

    answer = staff_client.post("/api/register", route_body("second", **{"path": "/orders", **overrides}), format="json")

    assert answer.status_code == 201, answer.content


def test_a_good_registration_with_every_option_is_accepted_and_answered_as_given(staff_client: APIClient) -> None:
    body = route_body(
        version="v2",
        methods=["GET", "POST"],
        hosts=["API.Example.com"],
        auth="jwt",
        balancer="ewma",
        strip_path=False,
        path_rewrite={"regex": r"^/orders/(?P<id>\d+)$", "replacement": r"/order?id=\g<id>"},
        timeout_s=2.5,
        retries=2,
        retry_non_idempotent=True,
        max_body_bytes=1024,
        request_headers={"add": {"X-From": "gateway"}, "set": {"Accept": "application/json"}, "remove": ["Cookie"]},
        response_headers={"remove": ["Server"]},
        fallback={"status": 503, "body": {"error": "down"}, "headers": {"Retry-After": "5"}},
        deprecated=True,
        sunset_at="2030-01-01T00:00:00Z",
        health_check={"path": "/healthz?deep=1", "interval_s": 5, "timeout_s": 1.5, "healthy": 2, "unhealthy": 3},
        breaker_failure_threshold=3,
        breaker_cooldown_s=10,
        breaker_half_open_requests=2,
        ttl_s=60,
        rate_limit_rpm=600,
        targets=[{"url": "https://[2001:db8::1]:8443/base", "weight": 3}, {"url": "http://10.0.0.2", "weight": 0}],
    )

    answer = staff_client.post("/api/register", body, format="json")

    assert answer.status_code == 201, answer.content
    shown = answer.json()
    assert shown["hosts"] == ["api.example.com"]  # host names are case-insensitive: stored lower-case
    for field in ("version", "methods", "auth", "balancer", "path_rewrite", "request_headers", "fallback"):
        assert shown[field] == body[field], field
    assert [t["weight"] for t in shown["targets"]] == [3, 0]


def test_a_patch_is_validated_like_a_registration(staff_client: APIClient) -> None:
    route = RouteFactory(name="orders")
    RouteTargetFactory(route=route)
    RouteFactory(name="billing")

    for body, field in [
        ({"path": "/admin"}, "path"),
        ({"name": "billing"}, "name"),  # names are unique
        ({"targets": []}, "targets"),
        ({"retries": 99}, "retries"),
        ({"fallback": {"status": 1}}, "fallback"),
        ({"bogus": 1}, "bogus"),
    ]:
        answer = staff_client.patch(f"/api/routes/{route.pk}/", body, format="json")
        assert answer.status_code == 400, (body, answer.content)
        assert _names(answer.json()["fields"], field), (body, answer.json())
    route.refresh_from_db()
    assert (route.name, route.path, route.retries) == ("orders", "/orders", 1)
