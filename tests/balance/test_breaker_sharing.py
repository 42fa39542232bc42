"""The breakers' write-through to Redis from a live gateway, and what happens while Redis is unreachable.

Redis only: without ``REDIS_URL`` there is nothing to share (the state machine is the same in-process one).
The outage is real: the gateway's breaker sync reaches Redis through a TCP forwarder the test cuts.
"""

from __future__ import annotations

import json
import logging
import time

import openai
import pytest
import redis
from django.conf import settings

from proxy.edge.breaker import breaker_reset, breaker_view
from proxy.edge.shared_state import shared_reset
from proxy.models import Deployment
from tests.proxy.helpers import key_make, model_make, upstream_make
from tests.tcp_forwarder import TcpForwarder

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(not settings.REDIS_URL, reason="REDIS_URL is unset: breakers are in-process only"),
]

MESSAGES = [{"role": "user", "content": "is the breaker shared"}]
WAIT_S = 10.0
REDIS_URL = settings.REDIS_URL  # the real one (a test below points the gateway elsewhere)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


def _shared_record(key: str) -> str | None:
    with _redis() as client:
        return client.hget(f"{settings.CACHE_KEY_PREFIX}:breaker", key)


def _wait_for_record(key: str, state: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while True:
        record = _shared_record(key)
        if record is not None and record.split(",")[0] == state:
            return record
        assert time.monotonic() < deadline, f"no shared record {state} for {key}: {record}"
        time.sleep(0.02)


def _trip(gateway_server, fake_upstream) -> tuple[str, openai.OpenAI]:
    upstream = upstream_make(base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=2)
    model_make("gpt-s", upstream)
    key = f"dep:{Deployment.objects.get(model__name='gpt-s').pk}"
    server = gateway_server()
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=key_make().secret, max_retries=0, timeout=10)
    fake_upstream.fail_next(100, status=500)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-s", messages=MESSAGES)
    return key, client


def test_a_trip_is_written_through_to_redis_and_an_operator_reset_clears_it(gateway_server, fake_upstream):
    key, client = _trip(gateway_server, fake_upstream)

    record = _wait_for_record(key, "2")  # open
    state, failures, until_ms, trips, _version = (int(part) for part in record.split(","))
    assert (failures, trips) == (0, 1)
    assert abs(until_ms / 1000 - breaker_view(key).open_until) < 0.01

    breaker_reset(key)

    assert _shared_record(key) is None
    assert breaker_view(key).state == "closed"
    fake_upstream.reset()
    assert client.chat.completions.create(model="gpt-s", messages=MESSAGES).choices


def test_with_redis_unreachable_breakers_work_locally_and_catch_up_when_it_is_back(
    gateway_server, fake_upstream, settings, caplog
):
    port = int(settings.REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    database = settings.REDIS_URL.rsplit("/", 1)[1]
    forwarder = TcpForwarder(port).start()
    forwarder.cut()
    settings.REDIS_URL = f"redis://127.0.0.1:{forwarder.port}/{database}"  # what the breaker sync connects to
    settings.BREAKER_SYNC_INTERVAL_S = 0.1
    try:
        key, client = _trip(gateway_server, fake_upstream)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="gpt-s", messages=MESSAGES)
        assert refused.value.status_code == 503  # decided locally
        assert len(fake_upstream.requests) == 2
        assert _shared_record(key) is None

        forwarder.restore()
        _wait_for_record(key, "2")  # the queued trip reached Redis once it was back
    finally:
        forwarder.cut()
    outage = [r for r in caplog.records if r.name == "proxy.edge.shared_state"]
    assert outage, "the outage was not logged"
    assert {r.levelno for r in outage} == {logging.WARNING}


def _as_another_worker(ops: list[list]) -> None:
    """Apply breaker operations to the shared records exactly as another worker's sync does (same script)."""
    from proxy.edge.shared_state import _BREAKER_LUA

    prefix = settings.CACHE_KEY_PREFIX
    with _redis() as client:
        client.eval(
            _BREAKER_LUA,
            1,
            f"{prefix}:breaker",
            f"{prefix}:breaker-events",
            int(time.time() * 1000),
            int(settings.BREAKER_COOLDOWN_MAX_S * 1000),
            json.dumps(ops),
        )


def _wait_for_view(key: str, state: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while breaker_view(key).state != state:
        assert time.monotonic() < deadline, f"{key} never {state} here: {breaker_view(key)}"
        time.sleep(0.01)


def test_a_trip_by_another_worker_is_adopted_here_and_so_is_its_reset(gateway_server, fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=2)
    model_make("gpt-s", upstream)
    key = f"dep:{Deployment.objects.get(model__name='gpt-s').pk}"
    server = gateway_server()
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=key_make().secret, max_retries=0, timeout=10)
    assert client.chat.completions.create(model="gpt-s", messages=MESSAGES).choices

    now_ms = int(time.time() * 1000)
    _as_another_worker([["fail", key, now_ms, 2, 30_000], ["fail", key, now_ms, 2, 30_000]])

    _wait_for_view(key, "open")  # this worker never saw a failure of its own
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-s", messages=MESSAGES)
    assert refused.value.status_code == 503
    assert len(fake_upstream.requests) == 1

    shared_reset(key)  # an operator's reset made in another process: published to every worker

    _wait_for_view(key, "closed")
    assert client.chat.completions.create(model="gpt-s", messages=MESSAGES).choices


def test_a_record_that_vanished_from_redis_is_forgotten(gateway_server, fake_upstream):
    key, _client = _trip(gateway_server, fake_upstream)
    _wait_for_record(key, "2")
    assert breaker_view(key).state == "open"

    with _redis() as client:
        client.delete(f"{settings.CACHE_KEY_PREFIX}:breaker")  # a FLUSHDB, a Redis restart without persistence

    _wait_for_view(key, "closed")  # re-read every sync interval while a breaker is not closed
