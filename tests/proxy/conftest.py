"""Proxy test fixtures: the fake OpenAI upstream and the live gateway.

- ``fake_upstream``: a started ``FakeUpstream`` (tests/proxy/fake_upstream.py), one per test, stopped after it.
- ``live_gateway`` / ``live_server_factory``: defined in tests/live_server.py (so tests outside this folder can
  import them too) and re-exported here. ``live_gateway`` brings ``transactional_db`` with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live_server import live_gateway, live_server_factory
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import usage

__all__ = ["fake_upstream", "live_gateway", "live_server_factory", "usage"]


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A fake OpenAI-compatible server on 127.0.0.1 (``.base_url`` ends in ``/v1``); fresh knobs for every test.

    Starting and stopping one takes a few milliseconds, so each test gets its own: nothing a test leaves
    behind (a hanging answer, a half-sent stream) can reach the next one.
    """
    upstream = FakeUpstream().start()
    try:
        yield upstream
    finally:
        upstream.stop()
