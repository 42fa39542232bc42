"""Ledger test fixtures: the live gateway and fake upstream of the proxy tests, and a database transport."""

from __future__ import annotations

import pytest

from tests.live_server import live_gateway, live_server_factory
from tests.proxy.conftest import fake_upstream

__all__ = ["database_transport", "fake_upstream", "live_gateway", "live_server_factory"]


@pytest.fixture
def database_transport(settings: pytest.FixtureRequest) -> None:
    """The usage thread writes the ledger itself (the embedded default), whatever broker the run has."""
    settings.USAGE_TRANSPORT = "database"  # type: ignore[attr-defined]
