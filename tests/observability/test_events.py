"""The event bus: usage and audit events on a ZeroMQ PUB socket and the Channels group, bounded, drops counted."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from decimal import Decimal
from typing import Any

import pytest
import zmq
from django.test import Client
from prometheus_client import REGISTRY

from gateway_stats.events import (
    GROUP,
    GROUP_MESSAGE_MAX,
    MAX_BATCH,
    bus,
    event_publish,
    usage_event_payload,
    usage_events_sink,
)
from gateway_stats.usage import UsageEvent
from tests.observability.conftest import MESSAGES, free_port
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import usage_flush

WAIT_S = 5.0
BUSES = ("queue", "channels", "zmq", "encode")


def counter(name: str, bus_name: str) -> float:
    return REGISTRY.get_sample_value(f"apiforge_events_{name}_total", {"bus": bus_name}) or 0.0


@pytest.fixture
def zmq_address(settings: Any, fresh_bus: Any) -> str:
    address = f"tcp://127.0.0.1:{free_port()}"
    settings.EVENTS_ZMQ_PUB = address
    return address


@pytest.fixture
def subscriber(zmq_address: str) -> Any:
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(zmq_address)
    yield sock
    sock.close()
    context.term()


def subscribe(sock: Any, topic: str) -> None:
    """Subscribe, then wait until the PUB side knows it (ZeroMQ drops what is published before: "slow joiner")."""
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        event_publish(topic, {"probe": True})
        if sock.poll(100):
            while sock.poll(50):
                sock.recv_multipart()  # the probes
            return
    raise AssertionError("the subscription did not reach the publisher in time")


def receive(sock: Any, count: int, wait: float = WAIT_S) -> list[tuple[str, dict[str, Any]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + wait
    while len(received) < count and time.monotonic() < deadline:
        if sock.poll(100):
            topic, data = sock.recv_multipart()
            payload = json.loads(data)
            if not payload.get("probe"):
                received.append((topic.decode(), payload))
    return received


def test_a_zeromq_subscriber_receives_the_usage_events_of_the_calls_made(gateway: Any, subscriber: Any) -> None:
    subscribe(subscriber, "usage")
    usage_flush()
    ids = [f"zmq-{n}" for n in range(3)]
    for request_id in ids[:2]:
        gateway.client.chat.completions.create(
            model="gpt-obs", messages=MESSAGES, extra_headers={"x-request-id": request_id}
        )
    for _ in gateway.client.chat.completions.create(
        model="gpt-obs", messages=MESSAGES, stream=True, extra_headers={"x-request-id": ids[2]}
    ):
        pass
    usage_flush()

    received = receive(subscriber, 3)
    assert [topic for topic, _ in received] == ["usage"] * 3
    events = {payload["request_id"]: payload for _, payload in received}
    assert set(events) == set(ids)
    expected = FakeUpstream.expected_usage(MESSAGES)
    first = events["zmq-0"]
    assert first["model"] == "gpt-obs"
    assert first["upstream"] == "obs-upstream"
    assert first["status"] == 200
    assert first["key_prefix"] == gateway.key.prefix
    assert (first["prompt_tokens"], first["completion_tokens"]) == (
        expected["prompt_tokens"],
        expected["completion_tokens"],
    )
    assert Decimal(first["cost"]) > 0
    assert first["event_id"]
    assert events["zmq-2"]["stream"] is True
    assert receive(subscriber, 1, wait=0.5) == [], "one event per call"


def test_audit_events_have_their_own_topic_and_json_safe_values(subscriber: Any) -> None:
    subscribe(subscriber, "audit")
    at = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    event_publish("audit", {"action": "key.create", "at": at, "budget": Decimal("1.50"), "scopes": frozenset({"a"})})
    event_publish("usage", {"request_id": "not-subscribed"})
    event_publish("audit", {"action": "key.revoke"})  # one socket keeps the order: the usage event was skipped

    assert receive(subscriber, 2) == [
        ("audit", {"action": "key.create", "at": "2025-01-02T03:04:05+00:00", "budget": "1.50", "scopes": ["a"]}),
        ("audit", {"action": "key.revoke"}),
    ]


def test_the_last_usage_events_go_out_when_the_server_stops(
    zmq_address: str, subscriber: Any, live_server_factory: Any, fake_upstream: Any, transactional_db: None
) -> None:
    from apiforge.asgi import application
    from tests.proxy.helpers import key_make, model_make, upstream_make

    server = live_server_factory(application)  # its lifespan starts the bus (and binds the socket)
    upstream = upstream_make(name="obs-upstream", base_url=fake_upstream.base_url)
    model_make("gpt-obs", upstream)
    key = key_make()
    subscribe(subscriber, "usage")
    import httpx

    answer = httpx.post(
        server.url("/v1/embeddings"),
        json={"model": "gpt-obs", "input": "last words"},
        headers={"Authorization": f"Bearer {key.secret}", "x-request-id": "at-shutdown"},
    )
    assert answer.status_code == 200
    server.stop()  # the emitter's last flush, then the bus publishes what it got and closes

    assert [payload["request_id"] for _, payload in receive(subscriber, 1)] == ["at-shutdown"]
    assert bus.zmq_state == "error", "closed"


def test_connect_mode_reaches_a_bound_subscriber(settings: Any, fresh_bus: Any) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    settings.EVENTS_ZMQ_PUB = f"tcp://127.0.0.1:{port}"
    settings.EVENTS_ZMQ_MODE = "connect"
    try:
        subscribe(sock, "usage")
        usage_events_sink([UsageEvent(request_id="connected", endpoint="/v1/embeddings", status=200)])
        assert [payload["request_id"] for _, payload in receive(sock, 1)] == ["connected"]
    finally:
        sock.close()
        context.term()


@pytest.mark.django_db
def test_ready_reports_zmq_only_when_configured(settings: Any, zmq_address: str) -> None:
    client = Client()
    assert client.get("/health/ready").json()["checks"]["zmq"] == "ok"

    settings.EVENTS_ZMQ_PUB = ""
    assert "zmq" not in client.get("/health/ready").json()["checks"]
    assert bus.zmq_status(timeout=0) == "disabled"


@pytest.mark.django_db
@pytest.mark.expect_error_log  # Django logs every 5xx answer (here the 503 of /health/ready) as an ERROR
def test_an_address_taken_by_another_process_is_an_error_and_its_events_are_counted_as_dropped(
    zmq_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    context = zmq.Context()
    squatter = context.socket(zmq.PUB)
    squatter.setsockopt(zmq.LINGER, 0)
    squatter.bind(zmq_address)
    dropped = counter("dropped", "zmq")
    try:
        with caplog.at_level(logging.WARNING, logger="gateway_stats.events"):
            response = Client().get("/health/ready")
            event_publish("usage", {"request_id": "nowhere"})
            assert bus.drain(WAIT_S)
    finally:
        squatter.close()
        context.term()

    assert response.status_code == 503
    assert response.json()["checks"]["zmq"] == "error"
    assert counter("dropped", "zmq") == dropped + 1
    assert "cannot bind the ZeroMQ socket" in caplog.text
    assert "EVENTS_ZMQ_MODE=connect" in caplog.text


async def test_the_staff_events_group_of_the_channel_layer_receives_usage_and_audit_events(fresh_bus: Any) -> None:
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer
    from django.conf import settings

    in_process = settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
    # As the live feed's consumer will: its own layer instance (the shared one, for an in-process layer).
    layer = get_channel_layer() if in_process else channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    channel = await layer.new_channel()
    await layer.group_add(GROUP, channel)
    event = UsageEvent(request_id="to-staff", endpoint="/v1/chat/completions", status=200, model="gpt-obs")
    try:

        def publish() -> bool:
            usage_events_sink([event])
            event_publish("audit", {"action": "user.login", "actor": 7})
            return bus.drain(WAIT_S)

        assert await asyncio.to_thread(publish)
        first = await asyncio.wait_for(layer.receive(channel), WAIT_S)
        second = await asyncio.wait_for(layer.receive(channel), WAIT_S)
    finally:
        await layer.group_discard(GROUP, channel)
        if not in_process:
            await layer.close_pools()

    assert first == {"type": "usage.events", "events": [usage_event_payload(event)]}
    assert second == {"type": "audit.events", "events": [{"action": "user.login", "actor": 7}]}


async def test_a_batch_of_calls_is_one_group_message_and_one_zeromq_message_per_call(
    zmq_address: str, subscriber: Any
) -> None:
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer
    from django.conf import settings

    await asyncio.to_thread(subscribe, subscriber, "usage")
    assert await asyncio.to_thread(bus.drain, WAIT_S)  # the probes are gone before the group is joined
    in_process = settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
    layer = get_channel_layer() if in_process else channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    channel = await layer.new_channel()
    await layer.group_add(GROUP, channel)
    # Values that look like the JSON around them stay in their event.
    ids = [f"batch-{n}" for n in range(GROUP_MESSAGE_MAX + 2)] + ['q"},{"event_id":"x', "nl\n},{"]
    events = [
        UsageEvent(request_id=request_id, endpoint="/v1/embeddings", status=200, model=f"m{n}", event_id=f"e{n}")
        for n, request_id in enumerate(ids)
    ]
    try:

        def publish() -> bool:
            usage_events_sink(events)
            return bus.drain(WAIT_S)

        assert await asyncio.to_thread(publish)
        messages = [await asyncio.wait_for(layer.receive(channel), WAIT_S) for _ in range(2)]
        received = await asyncio.to_thread(receive, subscriber, len(ids))
    finally:
        await layer.group_discard(GROUP, channel)
        if not in_process:
            await layer.close_pools()

    assert [message["type"] for message in messages] == ["usage.events", "usage.events"]
    assert [len(message["events"]) for message in messages] == [GROUP_MESSAGE_MAX, len(ids) - GROUP_MESSAGE_MAX]
    payloads = [usage_event_payload(event) for event in events]
    assert messages[0]["events"] + messages[1]["events"] == payloads
    assert received == [("usage", payload) for payload in payloads], "one message per call, in order"


def test_a_batch_larger_than_the_room_left_is_cut_and_the_rest_counted(settings: Any, fresh_bus: Any) -> None:
    settings.EVENTS_QUEUE_MAX = 5
    dropped, published = counter("dropped", "queue"), counter("published", "channels")
    usage_events_sink([UsageEvent(request_id=f"cut-{n}", endpoint="/v1/embeddings", status=200) for n in range(8)])
    assert bus.drain(WAIT_S)
    assert counter("dropped", "queue") == dropped + 3
    assert counter("published", "channels") == published + 5


def test_a_string_orjson_refuses_drops_that_event_only(zmq_address: str, subscriber: Any) -> None:
    subscribe(subscriber, "usage")
    dropped = counter("dropped", "encode")
    usage_events_sink(
        [
            UsageEvent(request_id="fine-1", endpoint="/v1/embeddings", status=200),
            UsageEvent(request_id="bad", endpoint="/v1/embeddings", status=200, model="bad\ud800"),
            UsageEvent(request_id="fine-2", endpoint="/v1/embeddings", status=200),
        ]
    )
    assert [payload["request_id"] for _, payload in receive(subscriber, 2)] == ["fine-1", "fine-2"]
    assert bus.drain(WAIT_S)
    assert counter("dropped", "encode") == dropped + 1


def test_without_any_bus_nothing_is_published_or_dropped(settings: Any, fresh_bus: Any) -> None:
    settings.CHANNEL_LAYERS = {}
    settings.EVENTS_ZMQ_PUB = ""
    before = {(name, bus_name): counter(name, bus_name) for name in ("published", "dropped") for bus_name in BUSES}
    usage_events_sink([UsageEvent(request_id="void", endpoint="/v1/embeddings", status=200)])
    event_publish("audit", {"action": "x"})
    assert bus.drain(WAIT_S)
    assert {(name, bus_name): counter(name, bus_name) for name, bus_name in before} == before


@pytest.mark.expect_error_log
def test_a_batch_that_breaks_the_publisher_is_logged_and_the_next_still_goes_out(
    fresh_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    published = counter("published", "channels")
    with caplog.at_level(logging.ERROR, logger="gateway_stats.events"):
        bus.publish_usage(["not a usage event"])  # type: ignore[list-item]
        assert bus.drain(WAIT_S)
    usage_events_sink([UsageEvent(request_id="after", endpoint="/v1/embeddings", status=200)])
    assert bus.drain(WAIT_S)
    assert "publishing a batch failed" in caplog.text
    assert counter("published", "channels") == published + 1


def test_a_full_queue_drops_new_events_and_counts_them(settings: Any, fresh_bus: Any, caplog) -> None:
    settings.EVENTS_QUEUE_MAX = 5
    dropped, published = counter("dropped", "queue"), counter("published", "channels")
    total = 3000

    with caplog.at_level(logging.WARNING, logger="gateway_stats.events"):
        started = time.perf_counter()
        for n in range(total):
            event_publish("usage", {"n": n})
        elapsed = time.perf_counter() - started
        assert bus.drain(WAIT_S)

    newly_dropped = counter("dropped", "queue") - dropped
    assert newly_dropped > 0
    assert newly_dropped + counter("published", "channels") - published == total, "each event published or counted"
    assert caplog.text.count("event bus queue full") == 1, "logged once, not per event"
    assert elapsed < 2.0, "publishing never waits for the publisher"


def test_a_failing_channel_layer_drops_and_counts_without_blocking(
    settings: Any, fresh_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}
    }
    dropped = counter("dropped", "channels")

    with caplog.at_level(logging.WARNING, logger="gateway_stats.events"):
        started = time.perf_counter()
        for n in range(5):
            event_publish("usage", {"n": n})
        assert time.perf_counter() - started < 0.5
        assert bus.drain(WAIT_S)
        event_publish("usage", {"n": 5})  # within the retry pause: dropped at once
        assert bus.drain(WAIT_S)

    assert counter("dropped", "channels") == dropped + 6
    assert caplog.text.count("the channel layer failed") == 1


def test_an_event_that_is_not_json_is_dropped_and_counted(fresh_bus: Any, caplog: pytest.LogCaptureFixture) -> None:
    dropped = counter("dropped", "encode")
    with caplog.at_level(logging.WARNING, logger="gateway_stats.events"):
        event_publish("audit", {"what": object()})
        assert bus.drain(WAIT_S)
    assert counter("dropped", "encode") == dropped + 1
    assert "is not JSON-serialisable" in caplog.text


def test_without_a_channel_layer_only_zeromq_is_used(settings: Any, zmq_address: str, subscriber: Any) -> None:
    settings.CHANNEL_LAYERS = {}
    published = counter("published", "channels")
    subscribe(subscriber, "usage")
    event_publish("usage", {"request_id": "zmq-only"})
    assert [payload["request_id"] for _, payload in receive(subscriber, 1)] == ["zmq-only"]
    assert counter("published", "channels") == published


def test_a_burst_is_published_in_batches_and_every_event_goes_out(fresh_bus: Any) -> None:
    published = counter("published", "channels")
    for n in range(1500):
        event_publish("usage", {"n": n})
    usage_events_sink(
        [UsageEvent(request_id=f"burst-{n}", endpoint="/v1/embeddings", status=200) for n in range(MAX_BATCH)]
    )
    event_publish("usage", {"n": "after"})
    assert bus.drain(WAIT_S)
    assert counter("published", "channels") == published + 1500 + MAX_BATCH + 1


def test_a_channel_layer_that_cannot_be_made_is_a_counted_failure(
    settings: Any, fresh_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "no_such_package.ChannelLayer"}}
    dropped = counter("dropped", "channels")
    with caplog.at_level(logging.WARNING, logger="gateway_stats.events"):
        event_publish("audit", {"action": "x"})
        assert bus.drain(WAIT_S)
    assert counter("dropped", "channels") == dropped + 1
    assert "the channel layer failed" in caplog.text


def test_a_broken_queue_setting_never_reaches_the_caller(
    settings: Any, fresh_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.EVENTS_QUEUE_MAX = "many"
    with caplog.at_level(logging.WARNING, logger="gateway_stats.events"):
        event_publish("audit", {"action": "x"})  # returns: fire and forget
    assert "could not queue an event on topic 'audit'" in caplog.text
