"""Gateway test fixtures: echo targets (real servers on 127.0.0.1), the live gateway, and a route maker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.gateway_catalog import gateway_invalidate
from proxy.models import Route, RouteTarget
from tests.gateway.echo_target import EchoTarget
from tests.live_server import live_gateway, live_server_factory

__all__ = ["echo", "live_gateway", "live_server_factory", "route_make", "target_factory"]


@pytest.fixture
def target_factory() -> Iterator[Callable[[str], EchoTarget]]:
    started: list[EchoTarget] = []

    def start(name: str = "target") -> EchoTarget:
        target = EchoTarget(name).start()
        started.append(target)
        return target

    yield start
    for target in started:
        target.stop()


@pytest.fixture
def echo(target_factory: Callable[[str], EchoTarget]) -> EchoTarget:
    return target_factory("a")


RouteMaker = Callable[..., Route]


@pytest.fixture
def route_make(transactional_db: None) -> RouteMaker:
    """``route_make(name, path, targets=[url or (url, weight) or (url, weight, health)], **fields)``: a route
    written with the ORM (the registry's services are tested in tests/routes), published to the gateway."""

    def make(name: str, path: str, targets: list[Any], **fields: Any) -> Route:
        fields.setdefault("auth", "none")
        route = Route.objects.create(name=name, path=path, **fields)
        for spec in targets:
            url, weight, health = (spec, 1, "healthy") if isinstance(spec, str) else (*spec, "healthy")[:3]
            RouteTarget.objects.create(route=route, url=url, weight=weight, health=health)
        gateway_invalidate()
        return route

    return make
