"""Limits enforced on the request path, seen by a client: the official ``openai`` client (and httpx) against a
live gateway and a fake upstream, on the limiter the settings choose (Redis in CI, in-process without it)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from proxy.catalog import catalog_invalidate
from proxy.edge import limits
from proxy.edge.admit import duration
from proxy.models import Model
from tests.gateway.conftest import echo, route_make, target_factory
from tests.live_server import live_gateway, live_server_factory
from tests.observability.conftest import sample, samples_parse
from tests.proxy.conftest import fake_upstream
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make, usage

__all__ = ["echo", "fake_upstream", "live_gateway", "live_server_factory", "route_make", "target_factory", "usage"]

MESSAGES = [{"role": "user", "content": "limit me"}]
USAGE = FakeUpstream.expected_usage(MESSAGES)
TOKENS = USAGE["prompt_tokens"] + USAGE["completion_tokens"]
DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+s$|^\d+ms$")


@pytest.fixture
def gateway(live_gateway: Any, fake_upstream: FakeUpstream) -> Any:
    upstream = upstream_make(base_url=fake_upstream.base_url, timeout_s=5, max_retries=0)
    model_make("gpt-lim", upstream)
    return live_gateway


def chat(gateway: Any, secret: str, **extra: Any) -> httpx.Response:
    body = {"model": "gpt-lim", "messages": MESSAGES, **extra}
    return httpx.post(gateway.url("/v1/chat/completions"), json=body, headers={"authorization": f"Bearer {secret}"})


def client(gateway: Any, secret: str, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url("/v1"), api_key=secret, max_retries=max_retries, timeout=20)


def settled() -> None:
    """Let the settle tasks the gateway scheduled after the last answers run (they are off the answer's path)."""
    time.sleep(0.2)


def test_rpm_limit_admits_exactly_n_per_minute_with_openai_headers_and_a_429_after(gateway, usage) -> None:
    key = key_make(rpm_limit=3)
    answers = [chat(gateway, key.secret) for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == ["2", "1", "0"]
    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
        assert DURATION.match(answer.headers["x-ratelimit-reset-requests"])
        assert "x-ratelimit-limit-tokens" not in answer.headers, "no tokens limit on this key"
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "requests per minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    records = usage.flushed()
    assert [(r.status, r.error_code) for r in records][-1] == (429, "rate_limit_exceeded")
    assert (records[-1].model, records[-1].key_id) == ("gpt-lim", key.pk)
    assert (records[-1].prompt_tokens, records[-1].completion_tokens) == (0, 0)


def test_a_key_without_limits_gets_no_ratelimit_headers(gateway) -> None:
    answer = chat(gateway, key_make().secret)
    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.startswith("x-ratelimit")]


def test_rejections_are_counted_in_metrics_by_limit(gateway) -> None:
    before = sample(
        samples_parse(httpx.get(gateway.url("/metrics")).text), "apiforge_ratelimit_rejections_total", limit="key_rpm"
    )
    key = key_make(rpm_limit=1)
    assert [chat(gateway, key.secret).status_code for _ in range(3)] == [200, 429, 429]
    after = sample(
        samples_parse(httpx.get(gateway.url("/metrics")).text), "apiforge_ratelimit_rejections_total", limit="key_rpm"
    )
    assert after - before == 2


def test_tpm_is_counted_from_real_usage_once_known(gateway, usage) -> None:
    # Each call reserves its estimate (the body's bytes / 4 + max_tokens), then settles to its real usage.
    limit = 100
    key = key_make(tpm_limit=limit)
    first = chat(gateway, key.secret, max_tokens=5)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == str(limit)
    assert DURATION.match(first.headers["x-ratelimit-reset-tokens"])
    estimate = limit - int(first.headers["x-ratelimit-remaining-tokens"])
    assert estimate > TOKENS, "the reservation is an upper bound of the real usage"
    settled()
    second = chat(gateway, key.secret, max_tokens=5)
    # The first call now counts for what it used, not for what it reserved.
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == limit - TOKENS - estimate
    admitted = 2
    for _ in range(40):
        settled()
        answer = chat(gateway, key.secret, max_tokens=5)
        if answer.status_code == 429:
            break
        admitted += 1
    assert admitted == (limit - estimate) // TOKENS + 1, "calls admitted until the next estimate no longer fits"
    assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in answer.json()["error"]["message"]
    assert sum(r.total_tokens for r in usage.flushed()) == admitted * TOKENS <= limit


def test_token_budget_is_spent_by_real_usage_then_insufficient_quota_without_client_retries(gateway, usage) -> None:
    key = key_make(budget_tokens=TOKENS * 2 + 1, budget_period="day")
    api = client(gateway, key.secret, max_retries=2)
    for _ in range(3):  # 2 calls spend 2*TOKENS; with 1 token left a third is still admitted (the overshoot bound)
        api.chat.completions.create(model="gpt-lim", messages=MESSAGES)
        settled()
    with pytest.raises(openai.RateLimitError) as caught:
        api.chat.completions.create(model="gpt-lim", messages=MESSAGES)
    error = caught.value
    assert error.code == "insufficient_quota"
    assert error.type == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert int(error.response.headers["retry-after"]) > 0
    assert "resets at" in error.message
    records = usage.flushed()
    assert [r.status for r in records] == [200, 200, 200, 429], "the client did not retry a spent budget"
    assert sum(r.total_tokens for r in records) == TOKENS * 3  # spent: at most one call over the budget


def test_cost_budget_refuses_once_spent(gateway) -> None:
    cost = (
        Decimal(USAGE["prompt_tokens"]) * Decimal("0.5") + Decimal(USAGE["completion_tokens"]) * Decimal("1.5")
    ) / 1000
    key = key_make(budget_cost=cost * 2, budget_period="month")
    statuses = []
    for _ in range(4):
        statuses.append(chat(gateway, key.secret, max_tokens=5).status_code)
        settled()
    assert statuses == [200, 200, 429, 429]
    assert chat(gateway, key.secret).json()["error"]["code"] == "insufficient_quota"


def test_concurrency_limit_holds_during_a_slow_stream_and_frees_at_its_end(gateway, fake_upstream) -> None:
    fake_upstream.chunks, fake_upstream.chunk_delay = 4, 0.25
    key = key_make(max_concurrency=1)
    api = client(gateway, key.secret)
    stream = api.chat.completions.create(model="gpt-lim", messages=MESSAGES, stream=True)
    next(iter(stream))  # the stream has started: its slot is taken
    refused = chat(gateway, key.secret)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert refused.headers["retry-after"] == "1"
    list(stream)
    settled()
    assert chat(gateway, key.secret).status_code == 200


def test_a_client_leaving_a_stream_frees_its_slot(gateway, fake_upstream) -> None:
    fake_upstream.chunks, fake_upstream.chunk_delay = 10, 0.5  # a 5 s stream
    key = key_make(max_concurrency=1)
    with httpx.stream(
        "POST",
        gateway.url("/v1/chat/completions"),
        json={"model": "gpt-lim", "messages": MESSAGES, "stream": True},
        headers={"authorization": f"Bearer {key.secret}"},
    ) as answer:
        pieces = answer.iter_raw()  # kept: a dropped iterator closes the response (the client would leave)
        next(pieces)
        assert chat(gateway, key.secret).status_code == 429
    # The client closed its connection mid-stream: its slot frees long before the stream would have ended.
    statuses = []
    for _ in range(30):
        statuses.append(chat(gateway, key.secret).status_code)
        if statuses[-1] == 200:
            break
        time.sleep(0.1)
    assert statuses[-1] == 200, statuses


def test_the_openai_client_retries_a_concurrency_refusal_after_retry_after_and_succeeds(gateway, fake_upstream) -> None:
    fake_upstream.latency = 0.6
    key = key_make(max_concurrency=1)
    first = threading.Thread(target=lambda: chat(gateway, key.secret))
    first.start()
    fake_upstream.wait_for_requests(1)
    answer = client(gateway, key.secret, max_retries=2).chat.completions.with_raw_response.create(
        model="gpt-lim", messages=MESSAGES
    )
    first.join(10)
    assert answer.http_response.status_code == 200
    assert answer.retries_taken >= 1


def test_the_openai_client_retries_an_rpm_refusal_once_the_oldest_call_leaves_the_window(gateway) -> None:
    key = key_make(rpm_limit=2)
    # Two calls made 59.5 s ago (the limiter's clock is a parameter): they leave the minute within ~2 s.
    past = time.time() - 59.5
    window = limits.Limit(f"k{key.pk}:r", "requests", 2, 1, 60.0)
    for _ in range(2):
        assert asyncio.run(limits.admit([window], now=past)).allowed
    refused = chat(gateway, key.secret)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) <= 2
    answer = client(gateway, key.secret, max_retries=2).chat.completions.with_raw_response.create(
        model="gpt-lim", messages=MESSAGES
    )
    assert answer.http_response.status_code == 200
    assert answer.retries_taken >= 1


def test_headers_ride_on_an_upstream_failure_too(gateway, fake_upstream) -> None:
    key = key_make(rpm_limit=5, tpm_limit=10_000)
    fake_upstream.fail_next(1, status=400)
    failed = chat(gateway, key.secret)
    assert failed.status_code == 400
    assert failed.headers["x-ratelimit-remaining-requests"] == "4"
    assert failed.headers["x-ratelimit-limit-tokens"] == "10000"


def test_the_model_listing_counts_against_the_rpm_limit(gateway) -> None:
    key = key_make(rpm_limit=1)
    headers = {"authorization": f"Bearer {key.secret}"}
    assert httpx.get(gateway.url("/v1/models"), headers=headers).status_code == 200
    refused = httpx.get(gateway.url("/v1/models"), headers=headers)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_fifty_concurrent_calls_on_a_nearly_spent_budget_overshoot_by_at_most_one_call(gateway, usage) -> None:
    key = key_make(budget_tokens=TOKENS * 3 + 1, budget_period="day")
    for _ in range(3):
        assert chat(gateway, key.secret, max_tokens=5).status_code == 200
        settled()
    usage.flushed()
    usage.records.clear()
    with ThreadPoolExecutor(max_workers=25) as pool:
        statuses = list(pool.map(lambda _: chat(gateway, key.secret, max_tokens=5).status_code, range(50)))
    assert statuses.count(200) == 1, "one token left: one call admitted, its reservation seen by the others"
    assert statuses.count(429) == 49
    spent_now = sum(r.total_tokens for r in usage.flushed())
    assert TOKENS * 3 + spent_now - (TOKENS * 3 + 1) <= TOKENS, "overshoot at most one call's tokens"


def test_duration_format_is_openais() -> None:
    assert [duration(s) for s in (0.02, 1, 59.2, 60, 360, 3723)] == ["20ms", "1s", "1m0s", "1m0s", "6m0s", "1h2m3s"]


# --- /gw/ routes ------------------------------------------------------------------------------------------


def test_a_route_rate_limit_counts_per_client_ip_on_an_open_route(live_gateway, echo, route_make) -> None:
    route_make("open", "/open", [echo.root_url], rate_limit_rpm=2)
    answers = [httpx.get(live_gateway.url("/gw/open/x")) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert "route" in answers[2].json()["error"]["message"]


def test_a_key_route_limit_counts_per_key(live_gateway, echo, route_make) -> None:
    route_make("keyed", "/keyed", [echo.root_url], auth="key", rate_limit_rpm=1)
    one, two = key_make(), key_make()
    call = lambda key: httpx.get(live_gateway.url("/gw/keyed/x"), headers={"x-api-key": key.secret})  # noqa: E731
    assert [call(one).status_code, call(two).status_code, call(one).status_code] == [200, 200, 429]


def test_a_keys_rpm_limit_applies_on_routes_too(live_gateway, echo, route_make) -> None:
    route_make("plain", "/plain", [echo.root_url], auth="key")
    key = key_make(rpm_limit=1)
    call = lambda: httpx.get(live_gateway.url("/gw/plain/x"), headers={"x-api-key": key.secret})  # noqa: E731
    first, second = call(), call()
    assert (first.status_code, second.status_code) == (200, 429)
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.json()["error"]["code"] == "rate_limit_exceeded"


# --- the owner's and the model's limits ---------------------------------------------------------------------


def test_a_users_rpm_limit_is_shared_by_all_their_keys(gateway) -> None:
    one = key_make()
    one.owner.rpm_limit = 3
    one.owner.save()
    two = key_make(owner=one.owner)
    statuses = [chat(gateway, key.secret).status_code for key in (one, two, one, two)]
    assert statuses == [200, 200, 200, 429], "a developer with many keys cannot multiply their quota"
    assert chat(gateway, key_make().secret).status_code == 200, "another user's keys are not limited by it"


def test_a_users_cost_budget_is_shared_by_all_their_keys(gateway) -> None:
    one = key_make()
    one.owner.budget_cost = Decimal("0.000001")
    one.owner.budget_period = "day"
    one.owner.save()
    two = key_make(owner=one.owner)
    assert chat(gateway, one.secret, max_tokens=5).status_code == 200  # within the budget when admitted
    settled()
    refused = chat(gateway, two.secret, max_tokens=5)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert "user's cost budget" in refused.json()["error"]["message"]


def test_a_users_new_limit_reaches_a_key_already_in_use(gateway, settings) -> None:
    key = key_make()
    assert chat(gateway, key.secret).status_code == 200  # the key's policy is now cached
    key.owner.rpm_limit = 1
    key.owner.save()
    time.sleep(settings.CACHE_SYNC_INTERVAL_S + 0.3)
    assert [chat(gateway, key.secret).status_code for _ in range(2)] == [200, 429]


def test_a_models_rpm_cap_holds_across_keys(gateway, settings) -> None:
    Model.objects.filter(name="gpt-lim").update(rpm_limit=2)
    catalog_invalidate()
    time.sleep(settings.CACHE_SYNC_INTERVAL_S + 0.3)
    statuses = [chat(gateway, key_make().secret).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = chat(gateway, key_make().secret)
    assert "on the model" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
