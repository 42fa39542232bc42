"""Balancer and breaker tests: every test starts and ends with this process's breakers and health verdicts
forgotten (they are process state, keyed by ``dep:<id>`` / ``rt:<id>``, which ids can repeat across tests).

The proxy fixtures (``fake_upstream``, ``live_gateway``, ``live_server_factory``, ``usage``) are re-exported.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.edge.breaker import breakers_forget
from tests.live_server import live_gateway, live_server_factory
from tests.proxy.conftest import fake_upstream
from tests.proxy.helpers import usage

__all__ = ["fake_upstream", "live_gateway", "live_server_factory", "usage"]


@pytest.fixture(autouse=True)
def _breakers_forgotten() -> Iterator[None]:
    breakers_forget()
    yield
    breakers_forget()
