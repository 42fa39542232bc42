"""The breakers' write-through to Redis from a live gateway, and what happens while Redis is unreachable.

Redis only: without ``REDIS_URL`` there is nothing to share (the state machine is the same in-process one).
The outage is real: the gateway's breaker sync reaches Redis through a TCP forwarder the test cuts.
"""

from __future__ import annotations

import logging
import time

import openai
import pytest
import redis
from django.conf import settings

from apiforge.asgi import application
from proxy.edge.breaker import breaker_reset, breaker_view
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


def _trip(live_server_factory, fake_upstream) -> tuple[str, openai.OpenAI]:
    upstream = upstream_make(base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=2)
    model_make("gpt-s", upstream)
    key = f"dep:{Deployment.objects.get(model__name='gpt-s').pk}"
    server = live_server_factory(application)
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=key_make().secret, max_retries=0, timeout=10)
    fake_upstream.fail_next(100, status=500)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-s", messages=MESSAGES)
    return key, client


def test_a_trip_is_written_through_to_redis_and_an_operator_reset_clears_it(
    transactional_db, live_server_factory, fake_upstream
):
    key, client = _trip(live_server_factory, fake_upstream)

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
    transactional_db, live_server_factory, fake_upstream, settings, caplog
):
    port = int(settings.REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    database = settings.REDIS_URL.rsplit("/", 1)[1]
    forwarder = TcpForwarder(port).start()
    forwarder.cut()
    settings.REDIS_URL = f"redis://127.0.0.1:{forwarder.port}/{database}"  # what the breaker sync connects to
    settings.BREAKER_SYNC_INTERVAL_S = 0.1
    try:
        key, client = _trip(live_server_factory, fake_upstream)
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
