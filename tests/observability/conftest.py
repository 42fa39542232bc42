"""Fixtures of the observability tests: the live gateway and fake upstream, a scraper, an event bus per test.

- ``gateway``: a live gateway, a fake upstream, one model ``gpt-obs`` on it and a key, with an ``openai`` client.
- ``scrape(client)``: ``/metrics`` parsed with prometheus_client's own parser, as ``{(sample name, labels): value}``.
- ``fresh_bus``: the event bus stopped before and after the test, so it starts again with the test's settings.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_stats.events import bus
from tests.live_server import live_gateway, live_server_factory
from tests.proxy.conftest import fake_upstream
from tests.proxy.helpers import key_make, model_make, upstream_make, usage

__all__ = ["fake_upstream", "live_gateway", "live_server_factory", "usage"]

MESSAGES = [{"role": "user", "content": "count me in please"}]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (sample name, labels)."""
    parsed: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return parsed


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter that never moved is not exposed)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gateway(live_gateway: Any, fake_upstream: Any) -> Any:
    upstream = upstream_make(name="obs-upstream", base_url=fake_upstream.base_url, timeout_s=5, max_retries=0)
    model_make("gpt-obs", upstream, upstream_model="fake-obs", input_price="0.5", output_price="1.5")
    key = key_make()
    client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0, timeout=10)
    return type("Gateway", (), {"live": live_gateway, "key": key, "client": client, "upstream": fake_upstream})


@pytest.fixture
def fresh_bus() -> Iterator[Any]:
    bus.stop()
    yield bus
    bus.stop()
