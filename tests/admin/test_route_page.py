"""The route change page as the control room: breaker reset, health check now, connection test, lease extension
(buttons behind a confirmation dialog, and bulk actions), per-target drain / restore, each audited; the panel
of the last 24 h and the targets' state, with a query count that does not grow with the ledger; staff without
the change permission refused."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import User
from gateway_stats.ledger import ledger_write, usage_row
from gateway_stats.models import AuditEvent
from gateway_stats.usage import UsageEvent
from proxy.edge.breaker import BreakerPolicy, breaker_failure, breaker_view, health_view, route_target_key
from proxy.models import Route, RouteTarget
from tests.factories import UserFactory
from tests.proxy.fake_upstream import FakeUpstream
from tests.routes.factories import RouteFactory, RouteTargetFactory

pytestmark = pytest.mark.django_db

CONFIRM = {"_form_submitted": "True"}  # Unfold's dialog form


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def closed_url() -> str:
    """A URL nothing listens on (a port bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _change(route: Route) -> str:
    return f"/admin/proxy/route/{route.pk}/change/"


def _action(route: Route, name: str) -> str:
    return f"/admin/proxy/route/{route.pk}/{name}/"


def _messages(client: Client, url: str) -> str:
    page = client.get(url)
    assert page.status_code == 200
    return page.content.decode()


def _audits(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("pk"))


def _trip(target: RouteTarget) -> None:
    breaker_failure(route_target_key(target.pk), BreakerPolicy(failure_threshold=1, cooldown_s=60))


def test_reset_breakers_closes_every_target_breaker_and_is_audited(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    route = RouteFactory(name="orders")
    first, second = RouteTargetFactory(route=route), RouteTargetFactory(route=route)
    _trip(first)
    _trip(second)
    client = admin_for(root)
    dialog = client.get(_action(route, "reset-breakers"))
    assert dialog.status_code == 200
    assert b"Reset circuit breakers" in dialog.content
    assert breaker_view(route_target_key(first.pk)).state == "open"  # the dialog's GET changes nothing

    answer = client.post(_action(route, "reset-breakers"), CONFIRM, HTTP_HX_REQUEST="true")

    assert answer.headers["HX-Redirect"] == _change(route)
    assert [breaker_view(route_target_key(t.pk)).state for t in (first, second)] == ["closed", "closed"]
    (event,) = _audits("route.breaker_reset")
    assert event.object_id == str(route.pk)
    assert event.actor == root
    assert [t["state"] for t in event.changes["targets"]] == ["open", "open"]
    assert "reset the breakers of 2 target(s) (2 were open" in _messages(client, _change(route))


def test_health_check_now_probes_each_target_records_its_verdict_and_reports_status_and_ms(
    root: User, admin_for: Callable[[User], Client], upstream: FakeUpstream, closed_url: str
) -> None:
    route = RouteFactory(health_check={"path": "/v1/models", "timeout_s": 2, "interval_s": 10})
    up = RouteTargetFactory(route=route, url=upstream.root_url)
    down = RouteTargetFactory(route=route, url=closed_url)
    drained = RouteTargetFactory(route=route, url="http://drained.internal:1", health=RouteTarget.Health.DRAINED)
    client = admin_for(root)

    answer = client.post(_action(route, "health-check"), CONFIRM)

    assert answer.status_code == 302
    assert answer.url == _change(route)
    assert health_view(route_target_key(up.pk)) == "healthy"
    assert health_view(route_target_key(down.pk)) == "unhealthy"
    assert health_view(route_target_key(drained.pk)) == "unknown"
    (probe,) = upstream.requests_to("/v1/models")
    assert probe.method == "GET"
    assert probe.headers["user-agent"] == "apiforge-health-check"
    page = _messages(client, _change(route))
    assert re.search(rf"{re.escape(upstream.root_url)}: ok, HTTP 200, \d+ ms", page)
    assert re.search(rf"{re.escape(closed_url)}: failed, ConnectError", page)
    assert "drained.internal:1: skipped (drained)" in page
    (event,) = _audits("route.health_check")
    assert [(r["ok"], r["status"]) for r in event.changes["results"]] == [(True, 200), (False, None), (False, None)]


def test_health_check_now_of_a_route_without_a_check_warns_and_probes_nothing(
    root: User, admin_for: Callable[[User], Client], upstream: FakeUpstream
) -> None:
    route = RouteFactory(health_check={})
    target = RouteTargetFactory(route=route, url=upstream.root_url)
    client = admin_for(root)

    client.post(_action(route, "health-check"), CONFIRM)

    assert "has no health check configured" in _messages(client, _change(route))
    assert upstream.requests == []
    assert health_view(route_target_key(target.pk)) == "unknown"
    assert _audits("route.health_check") == []


def test_connection_test_without_a_check_asks_for_the_root_and_records_no_verdict(
    root: User, admin_for: Callable[[User], Client], upstream: FakeUpstream
) -> None:
    route = RouteFactory(health_check={})
    target = RouteTargetFactory(route=route, url=upstream.root_url)
    client = admin_for(root)

    client.post(_action(route, "connection-test"), CONFIRM)

    assert [r.path for r in upstream.requests] == ["/"]
    page = _messages(client, _change(route))
    assert "(GET /)" in page
    assert re.search(r": ok, HTTP 404, \d+ ms", page)
    assert health_view(route_target_key(target.pk)) == "unknown"
    (event,) = _audits("route.connection_test")
    assert event.changes["path"] == "/"
    assert event.changes["results"][0]["status"] == 404


def test_connection_test_with_a_check_uses_its_path_and_reports_a_failing_target(
    root: User, admin_for: Callable[[User], Client], upstream: FakeUpstream
) -> None:
    route = RouteFactory(health_check={"path": "/v1/models", "timeout_s": 2})
    RouteTargetFactory(route=route, url=upstream.root_url)
    upstream.fail_next(1, status=503)
    client = admin_for(root)

    client.post(_action(route, "connection-test"), CONFIRM)

    assert [r.path for r in upstream.requests] == ["/v1/models"]
    assert re.search(r": failed, HTTP 503, \d+ ms", _messages(client, _change(route)))


def test_extend_lease_renews_it_brings_back_a_lapsed_route_and_is_audited(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    lapsed = timezone.now() - timedelta(minutes=5)
    route = RouteFactory(ttl_s=120, lease_expires_at=lapsed, is_active=False, deactivated_reason="lease_expired")
    RouteTargetFactory(route=route)
    client = admin_for(root)

    client.post(_action(route, "lease-extend"), CONFIRM)

    route.refresh_from_db()
    assert route.is_active
    assert route.deactivated_reason == ""
    assert route.lease_expires_at is not None
    assert timedelta(seconds=110) < route.lease_expires_at - timezone.now() <= timedelta(seconds=120)
    (event,) = _audits("route.lease_extend")
    assert event.changes["is_active"] == [False, True]
    assert "lease extended by 120 s" in _messages(client, _change(route))


def test_extend_lease_of_a_route_without_a_lease_warns(root: User, admin_for: Callable[[User], Client]) -> None:
    route = RouteFactory(ttl_s=None)
    RouteTargetFactory(route=route)
    client = admin_for(root)

    client.post(_action(route, "lease-extend"), CONFIRM)

    assert "has no lease (no ttl_s): nothing to extend" in _messages(client, _change(route))
    route.refresh_from_db()
    assert route.lease_expires_at is None
    assert _audits("route.lease_extend") == []


def test_each_target_row_drains_and_restores_that_target_only(root: User, admin_for: Callable[[User], Client]) -> None:
    route = RouteFactory()
    first, second = RouteTargetFactory(route=route), RouteTargetFactory(route=route)
    client = admin_for(root)
    drain = f"/admin/proxy/route/{route.pk}/targets/{first.pk}/drain/"
    page = _messages(client, _change(route))
    assert f'form="route-target-operations" formaction="{drain}"' in page
    # The buttons' form is not inside the change form: Enter in a field saves the route, never drains.
    main_form, buttons_form = page.index('id="route_form"'), page.index('<form id="route-target-operations"')
    assert "</form>" in page[main_form:buttons_form]

    assert client.post(drain).url == _change(route)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.health, second.health) == ("drained", "healthy")
    restore = f"/admin/proxy/route/{route.pk}/targets/{first.pk}/restore/"
    assert f'formaction="{restore}"' in _messages(client, _change(route))
    client.post(restore)
    first.refresh_from_db()
    assert first.health == "healthy"
    events = AuditEvent.objects.filter(action__startswith="route_target.").order_by("pk")
    assert [(e.action, e.object_id, e.changes["health"]) for e in events] == [
        ("route_target.drain", str(first.pk), ["healthy", "drained"]),
        ("route_target.restore", str(first.pk), ["drained", "healthy"]),
    ]


def test_the_target_view_refuses_a_get_an_unknown_operation_and_another_route_target(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    route, other = RouteFactory(), RouteFactory()
    target = RouteTargetFactory(route=route)
    client = admin_for(root)

    assert client.get(f"/admin/proxy/route/{route.pk}/targets/{target.pk}/drain/").status_code == 405
    client.post(f"/admin/proxy/route/{route.pk}/targets/{target.pk}/explode/")
    assert "Unknown operation “explode”" in _messages(client, _change(route))
    assert client.post(f"/admin/proxy/route/{other.pk}/targets/{target.pk}/drain/").status_code == 404
    target.refresh_from_db()
    assert target.health == "healthy"
    assert not AuditEvent.objects.filter(action__startswith="route").exists()


def test_the_target_view_checks_csrf(root: User) -> None:
    route = RouteFactory()
    target = RouteTargetFactory(route=route)
    client = Client(enforce_csrf_checks=True)
    client.force_login(root)

    assert client.post(f"/admin/proxy/route/{route.pk}/targets/{target.pk}/drain/").status_code == 403
    target.refresh_from_db()
    assert target.health == "healthy"


def test_the_changelist_bulk_actions_reset_check_and_extend_every_selected_route(
    root: User, admin_for: Callable[[User], Client], upstream: FakeUpstream
) -> None:
    leased = RouteFactory(ttl_s=60, lease_expires_at=timezone.now())
    checked = RouteFactory(health_check={"path": "/v1/models", "timeout_s": 2})
    leased_target = RouteTargetFactory(route=leased)
    checked_target = RouteTargetFactory(route=checked, url=upstream.root_url)
    _trip(leased_target)
    client = admin_for(root)
    selected = [str(leased.pk), str(checked.pk)]

    for name in ("reset_breakers", "run_health_checks", "extend_leases"):
        answer = client.post("/admin/proxy/route/", {"action": name, "_selected_action": selected})
        assert answer.status_code == 302

    assert breaker_view(route_target_key(leased_target.pk)).state == "closed"
    assert health_view(route_target_key(checked_target.pk)) == "healthy"
    leased.refresh_from_db()
    assert leased.lease_expires_at is not None
    assert leased.lease_expires_at > timezone.now() + timedelta(seconds=50)
    assert len(_audits("route.breaker_reset")) == 2
    assert len(_audits("route.health_check")) == 1
    assert len(_audits("route.lease_extend")) == 1
    page = _messages(client, "/admin/proxy/route/")
    assert f"“{leased.name}” has no health check configured" in page
    assert f"“{checked.name}” has no lease" in page


def test_staff_without_the_change_permission_cannot_operate_and_non_staff_are_sent_to_login(
    admin_for: Callable[[User], Client],
) -> None:
    route = RouteFactory(ttl_s=60, lease_expires_at=timezone.now())
    target = RouteTargetFactory(route=route)
    _trip(target)
    viewer = UserFactory(staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_route"))
    client = admin_for(viewer)
    page = client.get(_change(route))
    assert page.status_code == 200
    assert b'<div class="text-xs">Calls</div>' in page.content  # the panel reads, for those who may view
    assert b"Reset breakers" not in page.content  # no buttons they could not use
    assert b'form="route-target-operations"' not in page.content
    for name in ("reset-breakers", "health-check", "connection-test", "lease-extend"):
        assert client.post(_action(route, name), CONFIRM).status_code == 403, name
    assert client.post(f"/admin/proxy/route/{route.pk}/targets/{target.pk}/drain/").status_code == 403

    outsider = admin_for(UserFactory())
    answer = outsider.post(_action(route, "reset-breakers"), CONFIRM)
    assert answer.status_code == 302
    assert "/admin/login/" in answer.url

    target.refresh_from_db()
    assert target.health == "healthy"
    assert breaker_view(route_target_key(target.pk)).state == "open"
    assert not AuditEvent.objects.filter(action__startswith="route").exists()


def _calls(route: str, count: int, *, status: int = 200, error_code: str = "", latency_ms: float = 40.0) -> None:
    now = datetime.now(UTC)
    ledger_write(
        [
            usage_row(
                UsageEvent(
                    request_id=f"req-{uuid.uuid4().hex[:12]}",
                    endpoint="/orders/list",
                    status=status,
                    route=route,
                    latency_ms=latency_ms,
                    started_at=(now - timedelta(minutes=5 + index % 600)).timestamp(),
                    error_code=error_code,
                    event_id=uuid.uuid4().hex,
                )
            )
            for index in range(count)
        ]
    )


def test_the_panel_shows_the_last_day_of_the_route_and_each_target_state(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    route = RouteFactory(name="orders")
    target = RouteTargetFactory(route=route, url="http://orders-1.internal:8080")
    _trip(target)
    _calls("orders", 6, latency_ms=40.0)
    _calls("orders", 1, status=502, error_code="upstream_unreachable", latency_ms=900.0)
    _calls("orders", 1, status=503, error_code="no_healthy_upstream", latency_ms=900.0)
    _calls("billing", 5)  # another route's calls are not this one's
    old = UsageEvent(
        request_id="req-old",
        endpoint="/orders",
        status=500,
        route="orders",
        started_at=(datetime.now(UTC) - timedelta(hours=30)).timestamp(),
        event_id=uuid.uuid4().hex,
    )
    ledger_write([usage_row(old)])  # older than 24 h

    page = admin_for(root).get(_change(route)).content.decode()

    def card(label: str) -> str:
        found = re.search(rf'<div class="text-xs">{re.escape(label)}</div><div[^>]*>([^<]*)</div>', page)
        assert found, label
        return found.group(1)

    assert card("Calls") == "8"
    assert card("Error rate") == "25.0%"
    assert card("Refused, no target available") == "1"
    assert card("Latency p50").endswith(" ms")
    assert card("Latency p95").endswith(" ms")
    assert 35 <= float(card("Latency p50").removesuffix(" ms").replace(",", "")) <= 45
    assert 850 <= float(card("Latency p95").removesuffix(" ms").replace(",", "")) <= 950
    cells = [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r'<td class="px-2 py-1">(.*?)</td>', page)]
    assert cells[:4] == ["http://orders-1.internal:8080", "healthy", "unknown", "open"]
    assert "open for 60 s more" in page or "open for 59 s more" in page
    assert "“orders” now: last 24 h and the targets" in page  # the name, which the breadcrumb cuts short
    assert "Reset breakers" in page  # the buttons, for staff who may change routes
    assert "Check health" in page


def test_the_change_page_query_count_does_not_grow_with_the_ledger(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    route = RouteFactory(name="orders")
    for _ in range(3):
        RouteTargetFactory(route=route)
    client = admin_for(root)

    def queries() -> int:
        with CaptureQueriesContext(connection) as context:
            assert client.get(_change(route)).status_code == 200
        return len(context.captured_queries)

    queries()  # warm the process's caches (content types), which a test run alone finds cold
    _calls("orders", 10)
    few = queries()
    _calls("orders", 90, status=500, error_code="upstream_error")
    assert queries() == few


def test_the_add_page_has_no_panel(root: User, admin_for: Callable[[User], Client]) -> None:
    page: Any = admin_for(root).get("/admin/proxy/route/add/")
    assert page.status_code == 200
    assert b'<div class="text-xs">Calls</div>' not in page.content


def _add_form(**overrides: str) -> dict[str, str]:
    form = {
        "name": "orders",
        "path": "/orders",
        "version": "",
        "methods": "",
        "hosts": "",
        "auth": "key",
        "balancer": "round_robin",
        "path_rewrite": "{}",
        "timeout_s": "30",
        "retries": "1",
        "request_headers": "{}",
        "response_headers": "{}",
        "breaker_failure_threshold": "5",
        "breaker_cooldown_s": "30",
        "breaker_half_open_requests": "1",
        "is_active": "on",
        "targets-TOTAL_FORMS": "1",
        "targets-INITIAL_FORMS": "0",
        "targets-MIN_NUM_FORMS": "1",
        "targets-MAX_NUM_FORMS": "1000",
        "targets-0-url": "http://orders-1.internal:8080",
        "targets-0-weight": "1",
        "targets-0-health": "healthy",
    }
    form.update(overrides)
    return form


def _health_parts(*values: str) -> dict[str, str]:
    return {f"health_check_{index}": value for index, value in enumerate(values)}


def test_the_health_check_is_edited_as_its_five_parts(root: User, admin_for: Callable[[User], Client]) -> None:
    client = admin_for(root)

    answer = client.post("/admin/proxy/route/add/", _add_form(**_health_parts("/healthz", "5", "1.5", "2", "4")))

    assert answer.status_code == 302, answer.content.decode()[:2000]
    route = Route.objects.get(name="orders")
    assert route.health_check == {"path": "/healthz", "interval_s": 5, "timeout_s": 1.5, "healthy": 2, "unhealthy": 4}
    page = _messages(client, _change(route))
    assert 'name="health_check_0" value="/healthz"' in page
    assert 'name="health_check_2" value="1.5"' in page
    assert "Each target gets GET (its URL and the path) every interval" in page  # no words lost as HTML tags


def test_health_check_parts_left_empty_mean_no_check_or_the_checker_defaults(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    client = admin_for(root)
    client.post("/admin/proxy/route/add/", _add_form(**_health_parts("", "", "", "", "")))
    client.post("/admin/proxy/route/add/", _add_form(name="billing", path="/billing", **_health_parts("/up")))

    assert Route.objects.get(name="orders").health_check == {}
    assert Route.objects.get(name="billing").health_check == {"path": "/up"}


def test_bad_health_check_parts_get_the_services_messages(root: User, admin_for: Callable[[User], Client]) -> None:
    client = admin_for(root)

    bad = client.post("/admin/proxy/route/add/", _add_form(**_health_parts("healthz", "5", "0", "0", "")))
    pathless = client.post("/admin/proxy/route/add/", _add_form(**_health_parts("", "5")))

    assert bad.status_code == 200
    page = bad.content.decode()
    assert "path: must be a path starting with" in page
    assert "timeout_s: must be a number of seconds greater than 0" in page
    assert "healthy: must be a whole number from 1 to 100" in page
    assert "path: must be a path starting with" in pathless.content.decode()
    assert not Route.objects.exists()


def _fallback_parts(status: str = "", body: str = "", headers: str = "") -> dict[str, str]:
    return {"fallback_0": status, "fallback_1": body, "fallback_2": headers}


def test_the_fallback_is_edited_as_status_body_and_header_lines(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    client = admin_for(root)
    json_body = _fallback_parts("503", '{"error": "orders is down"}', "Retry-After: 30\r\nX-Degraded:  yes ")
    text_body = _fallback_parts("200", "try again later", "")

    answer = client.post("/admin/proxy/route/add/", _add_form(**json_body))
    client.post("/admin/proxy/route/add/", _add_form(name="billing", path="/billing", **text_body))

    assert answer.status_code == 302, answer.content.decode()[:2000]
    route = Route.objects.get(name="orders")
    assert route.fallback == {
        "status": 503,
        "body": {"error": "orders is down"},
        "headers": {"Retry-After": "30", "X-Degraded": "yes"},
    }
    assert Route.objects.get(name="billing").fallback == {"status": 200, "body": "try again later"}
    page = _messages(client, _change(route))
    assert 'name="fallback_0" value="503"' in page
    assert "Retry-After: 30" in page
    assert "&quot;error&quot;: &quot;orders is down&quot;" in page


def test_fallback_parts_left_empty_mean_no_fallback(root: User, admin_for: Callable[[User], Client]) -> None:
    client = admin_for(root)

    client.post("/admin/proxy/route/add/", _add_form(**_fallback_parts("", "  ", "")))

    assert Route.objects.get(name="orders").fallback == {}


def test_bad_fallback_parts_get_clear_messages(root: User, admin_for: Callable[[User], Client]) -> None:
    client = admin_for(root)

    statusless = client.post("/admin/proxy/route/add/", _add_form(**_fallback_parts("", "down")))
    bad_line = client.post("/admin/proxy/route/add/", _add_form(**_fallback_parts("503", "", "Retry-After 30")))
    bad_header = client.post("/admin/proxy/route/add/", _add_form(**_fallback_parts("503", "", "Content-Length: 1")))
    bad_status = client.post("/admin/proxy/route/add/", _add_form(**_fallback_parts("700")))

    assert "status: must be an HTTP status code, 100 to 599." in statusless.content.decode()
    assert "headers, line 1: write “Name: value” (got “Retry-After 30”)." in bad_line.content.decode()
    assert "headers: “Content-Length” is one of the gateway&#x27;s own headers" in bad_header.content.decode()
    assert bad_status.status_code == 200
    assert not Route.objects.exists()
