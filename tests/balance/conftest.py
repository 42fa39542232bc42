"""Balancer and breaker tests: every test starts and ends with this process's breakers and health verdicts
forgotten (they are process state, keyed by ``dep:<id>`` / ``rt:<id>``, which ids can repeat across tests).

``gateway_server()`` starts the real ASGI app under uvicorn (as many as a test wants; ``live_gateway`` is one
started for the test) and drops the usage events left over before the servers stop: the usage emitter's
shutdown flush would otherwise write keys' ``last_used_at`` from a thread that never gives its pooled
PostgreSQL connection back (one lost per server, until the pool is empty).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway_stats.usage import emitter
from proxy.edge.breaker import breakers_forget
from tests.live_server import LiveServer, live_server_factory
from tests.proxy.conftest import fake_upstream
from tests.proxy.helpers import usage

__all__ = ["fake_upstream", "live_server_factory", "usage"]


@pytest.fixture(autouse=True)
def _breakers_forgotten() -> Iterator[None]:
    breakers_forget()
    yield
    breakers_forget()


@pytest.fixture
def gateway_server(
    transactional_db: None, live_server_factory: Callable[..., LiveServer]
) -> Iterator[Callable[..., LiveServer]]:
    from apiforge.asgi import application

    def start(**config: Any) -> LiveServer:
        return live_server_factory(application, **config)

    yield start
    emitter.discard()  # before live_server_factory stops the servers (it was set up first)


@pytest.fixture
def live_gateway(gateway_server: Callable[..., LiveServer]) -> LiveServer:
    return gateway_server()
