"""The route services called directly, as the admin and tasks call them: the rules hold without the API's
serializers in front (``model_checks=False`` is the admin form's case), allowlist matching, no-op writes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from gateway_stats.models import AuditEvent
from proxy.models import Route
from proxy.route_services import (
    MAX_HEADERS,
    MAX_TARGETS,
    TargetSpec,
    fallback_errors,
    header_transform_errors,
    path_rewrite_errors,
    route_leases_expire,
    route_targets_health_set,
    route_update,
    route_validate,
    target_allowed,
    target_url_errors,
    targets_errors,
)
from tests.routes.factories import RouteFactory, RouteTargetFactory

pytestmark = pytest.mark.django_db


def _errors(route: Route, targets: list[TargetSpec] | None = None) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as caught:
        route_validate(route=route, targets=targets, model_checks=False)
    return caught.value.message_dict


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"path": ""}, "path"),
        ({"path": "/orders\\x"}, "path"),
        ({"methods": "GET"}, "methods"),
        ({"methods": ["FETCH"]}, "methods"),
        ({"hosts": "a.example.com"}, "hosts"),
        ({"hosts": [f"h{i}.example.com" for i in range(51)]}, "hosts"),
        ({"timeout_s": 0.0}, "timeout_s"),
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"retries": 11}, "retries"),
        ({"ttl_s": 3}, "ttl_s"),
        ({"ttl_s": 10**9}, "ttl_s"),
        ({"breaker_failure_threshold": 0}, "breaker_failure_threshold"),
        ({"breaker_cooldown_s": float("nan")}, "breaker_cooldown_s"),
        ({"breaker_half_open_requests": 0}, "breaker_half_open_requests"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"rate_limit_rpm": 0}, "rate_limit_rpm"),
        ({"version": "v/2"}, "version"),
    ],
)
def test_the_rules_hold_without_the_apis_serializers(fields: dict[str, Any], field: str) -> None:
    route = Route(**{"name": "orders", "path": "/orders", **fields})

    assert field in _errors(route)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"add": "X-A"}, "add: must be an object"),
        ({"add": {"X-A": "a" * 9000}}, "longer than"),
        ({"add": {f"X-{i}": "v" for i in range(MAX_HEADERS + 1)}}, f"At most {MAX_HEADERS}"),
    ],
)
def test_header_transform_rules(config: dict[str, Any], message: str) -> None:
    assert any(message in error for error in header_transform_errors(config))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"template": "/a b"}, "must not contain whitespace"),
        ({"template": "/a?b"}, "must not contain whitespace"),
        ({"regex": "", "replacement": "/"}, "regex: must be"),
        ({"regex": "^/a", "replacement": 5}, "replacement: must be a string"),
        ({"regex": "^/a", "replacement": "/b\n"}, "line breaks"),
        ({"regex": "^/(a)", "replacement": "/b\\"}, "lone backslash"),
        ({"regex": "^/(?P<id>a)", "replacement": r"/\g<other>"}, r"\g<other>"),
    ],
)
def test_path_rewrite_rules(config: dict[str, Any], message: str) -> None:
    assert any(message in error for error in path_rewrite_errors(config))


def test_valid_rewrites_pass() -> None:
    assert path_rewrite_errors({}) == []
    assert path_rewrite_errors({"template": "/api/{path}"}) == []
    assert path_rewrite_errors({"regex": "^/(?P<id>a)/(b)", "replacement": r"/\g<id>/\2/\g<1>"}) == []


def test_fallback_rules() -> None:
    assert fallback_errors("503") == ['Must be an object: {"status": 503, "body": "...", "headers": {}}.']
    assert any("body: at most" in e for e in fallback_errors({"status": 503, "body": {"x": "y" * 70000}}))
    assert any(
        "headers: at most" in e for e in fallback_errors({"status": 503, "headers": {f"X-{i}": "v" for i in range(51)}})
    )
    assert fallback_errors({"status": 200, "body": [1, 2], "headers": {"Content-Type": "application/x"}}) == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "Enter a URL"),
        ("http://a.internal/" + "x" * 500, "At most 500"),
        ("http://a.internal:0", "Port 0"),
        ("http://[::1", "Not a valid URL"),
    ],
)
def test_target_url_rules(url: Any, message: str) -> None:
    assert any(message in error for error in target_url_errors(url))


def test_target_list_rules() -> None:
    many = [TargetSpec(url=f"http://t{i}.internal") for i in range(MAX_TARGETS + 1)]
    assert "targets" in targets_errors(many)
    assert "targets.0.weight" in targets_errors([TargetSpec(url="http://a.internal", weight=True)])
    assert "targets.0.health" in targets_errors([TargetSpec(url="http://a.internal", health="sick")])


@pytest.mark.parametrize(
    ("url", "allowlist", "allowed"),
    [
        ("http://a.internal:8080", ["a.internal"], True),
        ("http://a.internal:8080", ["a.internal:8080"], True),
        ("https://a.internal", ["a.internal:443"], True),
        ("http://a.internal", ["a.internal:443"], False),
        ("http://10.0.0.5", ["10.0.0.5"], True),
        ("http://[::1]:9000", ["[::1]:9000"], True),
        ("http://[::1]:9001", ["[::1]:9000"], False),
        ("http://a.internal", ["", "  ", "bad:port:x", "[nonsense]:1", "b.internal"], False),
        ("http://10.0.0.5", ["a.internal", "10.0.0.0/8"], True),
        ("http://a.internal", ["10.0.0.0/8"], False),  # host names are never resolved
    ],
)
def test_allowlist_matching(url: str, allowlist: list[str], allowed: bool) -> None:
    assert target_allowed(url, allowlist) is allowed


def test_a_write_that_changes_nothing_is_not_audited_nor_published() -> None:
    route = RouteFactory(name="orders", timeout_s=10)
    RouteTargetFactory(route=route, url="http://a.internal")

    route_update(route=route, data={"timeout_s": 10}, targets=[TargetSpec(url="http://a.internal")])

    assert not AuditEvent.objects.exists()


def test_a_route_created_inactive_says_who_deactivated_it(staff: Any) -> None:
    from proxy.route_services import route_create

    route = route_create(
        data={"name": "orders", "path": "/orders", "is_active": False}, targets=[TargetSpec(url="http://a.internal")]
    )

    assert (route.is_active, route.deactivated_reason) == (False, "operator")


def test_target_health_changes_refuse_unknown_states_and_report_no_change() -> None:
    route = RouteFactory(name="orders")
    RouteTargetFactory(route=route, health="drained")

    with pytest.raises(ValidationError):
        route_targets_health_set(route=route, health="sick")
    assert route_targets_health_set(route=route, health="drained") == 0


def test_the_lease_sweep_takes_the_moment_it_is_given() -> None:
    RouteFactory(name="orders", ttl_s=10, lease_expires_at=timezone.now() + timedelta(seconds=30))

    assert route_leases_expire(now=timezone.now()) == []
    assert route_leases_expire(now=timezone.now() + timedelta(seconds=60)) == ["orders"]
