"""Shared setup for proxy tests: upstreams, models and keys in the database, and captured usage."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from gateway_stats.usage import UsageEvent, emitter
from proxy.models import Deployment, Model, Upstream
from tests.factories import ApiKeyFactory
from tests.live_server import live_requests_settle


def upstream_make(*, name: str = "fake", base_url: str = "", kind: str = "openai", **fields: Any) -> Upstream:
    api_key = fields.pop("api_key", "")
    upstream = Upstream(name=name, kind=kind, base_url=base_url, **fields)
    upstream.api_key = api_key
    upstream.save()
    return upstream


def model_make(
    name: str,
    upstream: Upstream,
    *,
    upstream_model: str | None = None,
    fallbacks: list[str] | None = None,
    input_price: str = "0.5",
    output_price: str = "1.5",
) -> Model:
    model = Model.objects.create(
        name=name,
        fallbacks=fallbacks or [],
        input_price_per_1k=Decimal(input_price),
        output_price_per_1k=Decimal(output_price),
    )
    Deployment.objects.create(model=model, upstream=upstream, upstream_model=upstream_model or f"{name}-upstream")
    return model


def key_make(**fields: Any) -> Any:
    """An active API key; its secret is ``key.secret``."""
    return ApiKeyFactory(**fields)


def usage_flush() -> int:
    """Flush the usage emitter once the live servers' calls have ended; how many events went out.

    A streamed answer is accounted after its last chunk is sent, so the client can have read all of it
    before the server queues its usage event: flushing at once could miss it.
    """
    live_requests_settle()
    return emitter.flush()


class UsageCapture:
    """Collects the usage records the proxy hands off (a sink on the real emitter)."""

    def __init__(self) -> None:
        self.records: list[UsageEvent] = []

    def __call__(self, batch: list[UsageEvent]) -> None:
        self.records.extend(batch)

    def flushed(self) -> list[UsageEvent]:
        """Every record so far, once the live servers' calls have ended (see ``usage_flush``)."""
        usage_flush()
        return list(self.records)


@pytest.fixture
def usage() -> Iterator[UsageCapture]:
    capture = UsageCapture()
    emitter.sinks.append(capture)
    try:
        yield capture
    finally:
        emitter.flush()
        emitter.sinks.remove(capture)
