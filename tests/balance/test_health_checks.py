"""Active health checks of route targets: the real checker (started by the gateway's lifespan) probes each
target of a route with a ``health_check``; a dead one is marked unhealthy, and healthy again once it answers.

The target is a fake HTTP server behind a TCP forwarder the test cuts (connections refused, as when the
service is down) and restores. Routes are real rows; the balancer seen is the one ``gateway_get()`` built.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import httpx
import pytest

from proxy.edge import health
from proxy.edge.breaker import health_view
from proxy.gateway_catalog import gateway_get, gateway_invalidate
from proxy.models import Route, RouteTarget
from tests.live_server import LiveServer
from tests.proxy.fake_upstream import FakeUpstream
from tests.tcp_forwarder import TcpForwarder

WAIT_S = 10.0
CHECK = {"path": "/v1/models", "interval_s": 0.1, "timeout_s": 0.5, "healthy": 2, "unhealthy": 2}


@pytest.fixture
def target_server(fake_upstream: FakeUpstream) -> Iterator[TcpForwarder]:
    forwarder = TcpForwarder(fake_upstream.port).start()
    try:
        yield forwarder
    finally:
        forwarder.cut()


def _wait_for(key: str, verdict: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while health_view(key) != verdict:
        assert time.monotonic() < deadline, f"{key} never became {verdict} (still {health_view(key)})"
        time.sleep(0.02)


def _ready_breakers(server: LiveServer) -> dict:
    return httpx.get(server.url("/health/ready"), timeout=5).json().get("breakers", {})


@pytest.fixture(params=["shared", "in_process"])
def sharing(request, settings) -> str:
    """Verdicts shared through Redis (one prober per target), or counted by this process alone."""
    if request.param == "shared" and not settings.REDIS_URL:
        pytest.skip("REDIS_URL is unset: no shared verdicts")
    if request.param == "in_process":
        settings.REDIS_URL = ""  # what the breaker sync (and so the checker) shares through
    return str(request.param)


def test_a_dead_target_is_marked_unhealthy_and_skipped_then_brought_back(
    gateway_server, fake_upstream, target_server, caplog, sharing
):
    route = Route.objects.create(name="orders", path="/orders", auth="none", health_check=CHECK)
    dying = RouteTarget.objects.create(route=route, url=f"http://127.0.0.1:{target_server.port}")
    steady = RouteTarget.objects.create(route=route, url=fake_upstream.root_url)
    server = gateway_server()  # its lifespan starts the checker, which reads these routes
    entry = next(r for r in gateway_get().routes if r.name == "orders")
    dying_key, steady_key = f"rt:{dying.pk}", f"rt:{steady.pk}"
    assert [t.key for t in entry.targets] == [dying_key, steady_key]

    _wait_for(dying_key, "healthy")
    _wait_for(steady_key, "healthy")
    target_server.cut()
    _wait_for(dying_key, "unhealthy")

    assert _ready_breakers(server)[dying_key] == {"state": "closed", "health": "unhealthy", "trips": 0}
    assert {entry.balancer.pick().key for _ in range(4)} == {steady_key}  # type: ignore[union-attr]
    target_server.restore()
    _wait_for(dying_key, "healthy")
    assert dying_key not in _ready_breakers(server)
    assert {entry.balancer.pick().key for _ in range(4)} == {dying_key, steady_key}  # type: ignore[union-attr]
    assert health_view(steady_key) == "healthy"
    # Going down and coming back are told once each, at WARNING; a dead target is no ERROR.
    told = [r for r in caplog.records if r.name == "proxy.edge.health"]
    assert [r.levelno for r in told] == [logging.WARNING, logging.WARNING]
    assert [r.getMessage() for r in told] == [
        f"health check: target {dying_key} is now unhealthy",
        f"health check: target {dying_key} is now healthy",
    ]


def test_all_targets_unhealthy_are_tried_anyway(gateway_server, target_server):
    route = Route.objects.create(name="lonely", path="/lonely", auth="none", health_check=CHECK)
    only = RouteTarget.objects.create(route=route, url=f"http://127.0.0.1:{target_server.port}")
    target_server.cut()
    gateway_server()
    entry = next(r for r in gateway_get().routes if r.name == "lonely")

    _wait_for(f"rt:{only.pk}", "unhealthy")

    picked = entry.balancer.pick()
    assert picked is not None
    assert picked.key == f"rt:{only.pk}"


def test_drained_targets_and_routes_without_a_check_are_not_probed(gateway_server, fake_upstream):
    checked = Route.objects.create(name="checked", path="/checked", auth="none", health_check=CHECK)
    drained = RouteTarget.objects.create(route=checked, url=fake_upstream.root_url, health="drained")
    unchecked = Route.objects.create(name="unchecked", path="/unchecked", auth="none")
    plain = RouteTarget.objects.create(route=unchecked, url=fake_upstream.root_url + "/x")
    probe = RouteTarget.objects.create(route=checked, url=fake_upstream.root_url + "/")
    gateway_server()

    _wait_for(f"rt:{probe.pk}", "healthy")

    assert health_view(f"rt:{drained.pk}") == "unknown"
    assert health_view(f"rt:{plain.pk}") == "unknown"
    assert {r.path for r in fake_upstream.requests} == {"/v1/models"}


def test_no_checker_runs_when_health_checks_are_off(gateway_server, fake_upstream, settings):
    settings.HEALTH_CHECKS = False
    route = Route.objects.create(name="off", path="/off", auth="none", health_check=CHECK)
    target = RouteTarget.objects.create(route=route, url=fake_upstream.root_url)
    gateway_server()

    time.sleep(0.3)  # three intervals of the check

    assert health_view(f"rt:{target.pk}") == "unknown"
    assert fake_upstream.requests == []


def test_a_target_no_longer_checked_loses_its_verdict(gateway_server, target_server, monkeypatch):
    monkeypatch.setattr(health, "ROUTES_REFRESH_S", 0.2)  # the checker re-reads the routes this often
    route = Route.objects.create(name="gone", path="/gone", auth="none", health_check=CHECK)
    target = RouteTarget.objects.create(route=route, url=f"http://127.0.0.1:{target_server.port}")
    key = f"rt:{target.pk}"
    target_server.cut()
    server = gateway_server()
    _wait_for(key, "unhealthy")

    Route.objects.filter(pk=route.pk).update(health_check={})
    gateway_invalidate()

    _wait_for(key, "unknown")  # the stored health ("healthy") decides again
    assert key not in _ready_breakers(server)


@pytest.mark.django_db(transaction=True)
def test_a_checker_and_breaker_sync_left_by_a_server_that_never_shut_down_are_replaced(settings):
    """A server forced out (its lifespan shutdown never ran) leaves its checker and sync on a closed loop; the
    next server in the process starts its own instead of counting on dead tasks."""
    from proxy.edge import shared_state

    settings.HEALTH_CHECKS = True

    async def started() -> tuple[object, object, bool]:
        await shared_state.shared_start()
        await health.health_checker_start()
        checker = health._checker[0]
        return shared_state._sync[0], checker, checker.task is not None and not checker.task.done()

    first_sync, first_checker, _ = asyncio.run(started())  # the loop closes without the shutdown

    async def started_again() -> tuple[object, object, bool]:
        try:
            return await started()
        finally:
            await health.health_checker_stop()
            await shared_state.shared_stop()

    second_sync, second_checker, running = asyncio.run(started_again())
    assert second_sync is not first_sync
    assert second_checker is not first_checker
    assert running
    assert shared_state._sync == []
    assert health._checker == []
