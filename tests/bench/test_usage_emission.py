"""Usage hand-off: what ``proxy_handle`` spends per request to record usage (an append to a deque)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway_stats.usage import UsageEvent, emitter, usage_event_emit

pytestmark = pytest.mark.bench


@pytest.fixture(autouse=True)
def _no_sinks(monkeypatch):
    """Measure the hand-off alone: the sinks (ledger, last_used_at) are the background thread's business."""
    monkeypatch.setattr(emitter, "sinks", [])
    yield
    emitter.flush()


def _record() -> UsageEvent:
    return UsageEvent(
        request_id="bench-0001",
        endpoint="/v1/chat/completions",
        status=200,
        key_id=1,
        user_id=1,
        model="bench-model",
        upstream="bench-upstream",
        upstream_model="gpt-x",
        prompt_tokens=9,
        completion_tokens=8,
        latency_ms=0.4,
        client_ip="127.0.0.1",
        input_price_per_1k=Decimal("0.5"),
        output_price_per_1k=Decimal("1.5"),
    )


def test_usage_event_emit_of_a_built_event(benchmark):
    record = _record()
    benchmark(usage_event_emit, record)
    assert emitter.flush() >= 1


def test_usage_record_build_and_emit(benchmark):
    """What the hot path does per request: build the record, fill it, hand it off."""

    def build_and_emit():
        record = UsageEvent(request_id="bench-0002", endpoint="/v1/chat/completions", status=0, client_ip="127.0.0.1")
        record.key_id, record.user_id, record.model = 1, 1, "bench-model"
        record.status = 200
        usage_event_emit(record)
        return record

    record = benchmark(build_and_emit)
    assert record.status == 200
    assert emitter.flush() >= 1
