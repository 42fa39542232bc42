"""Model deployments behind breakers, through the real gateway with the official ``openai`` client.

A failing deployment's breaker opens after its upstream's ``breaker_failure_threshold`` and the fake behind it
then receives no call at all while another deployment (or a fallback model) answers; with everything open the
answer is 503 ``no_healthy_upstream`` with ``Retry-After``; a 4xx is not a failure; a stream that breaks counts;
the state shows in ``/health/ready`` and ``/metrics``, and a probe after the cooldown closes the breaker again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from proxy.edge.breaker import breaker_view
from proxy.models import Deployment, Model
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make

MESSAGES = [{"role": "user", "content": "are you there"}]
CHAT = "/v1/chat/completions"
WAIT_S = 5.0


@pytest.fixture
def second_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def client(live_gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key_make().secret, max_retries=0, timeout=10)


def _chat(client: openai.OpenAI, model: str = "gpt-b", **extra) -> str:
    answer = client.chat.completions.create(model=model, messages=MESSAGES, **extra)
    return answer.choices[0].message.content or ""


def _deployment_key(model: str, upstream_name: str) -> str:
    deployment = Deployment.objects.get(model__name=model, upstream__name=upstream_name)
    return f"dep:{deployment.pk}"


def test_a_failing_deployment_gets_no_more_calls_once_its_breaker_opens(
    client, fake_upstream, second_upstream, live_gateway
):
    failing = upstream_make(name="failing", base_url=fake_upstream.base_url, max_retries=1, breaker_failure_threshold=2)
    healthy = upstream_make(name="healthy", base_url=second_upstream.base_url, max_retries=1)
    model = model_make("gpt-b", failing, upstream_model="on-failing")
    Deployment.objects.create(model=model, upstream=healthy, upstream_model="on-healthy")
    fake_upstream.fail_next(100, status=500)

    answers = [_chat(client) for _ in range(10)]

    assert answers == [FakeUpstream.expected_content(MESSAGES)] * 10  # every call answered (retried on healthy)
    assert len(fake_upstream.requests_to(CHAT)) == 2, "the failing deployment was called past its threshold"
    assert len(second_upstream.requests_to(CHAT)) == 10
    key = _deployment_key("gpt-b", "failing")
    assert breaker_view(key).state == "open"
    ready = httpx.get(live_gateway.url("/health/ready")).json()
    assert ready["breakers"][key]["state"] == "open"
    assert 1 <= ready["breakers"][key]["retry_in_s"] <= 30
    assert {"status", "checks"} <= set(ready)
    metrics = httpx.get(live_gateway.url("/metrics")).text
    assert f'apiforge_breaker_state{{key="{key}"}} 2.0' in metrics


def test_every_deployment_open_is_a_503_with_retry_after(client, fake_upstream, usage):
    upstream = upstream_make(
        base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=2, breaker_cooldown_s=20
    )
    model_make("gpt-b", upstream)
    fake_upstream.fail_next(100, status=503)

    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as failed:
            _chat(client)
        assert failed.value.status_code == 502
    with pytest.raises(openai.APIStatusError) as refused:
        _chat(client)

    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "no_healthy_upstream"  # type: ignore[index]
    assert refused.value.body["type"] == "api_error"  # type: ignore[index]
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 20
    assert len(fake_upstream.requests_to(CHAT)) == 2
    records = usage.flushed()
    assert [r.status for r in records] == [502, 502, 503]
    assert records[-1].error_code == "no_healthy_upstream"


def test_with_every_deployment_open_the_fallback_model_answers(client, fake_upstream, second_upstream):
    primary = upstream_make(name="primary", base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=1)
    backup = upstream_make(name="backup", base_url=second_upstream.base_url, max_retries=0)
    model_make("gpt-backup", backup, upstream_model="backup-model")
    model_make("gpt-b", primary, fallbacks=["gpt-backup"])
    fake_upstream.fail_next(100, status=500)

    answers = [_chat(client) for _ in range(4)]

    assert answers == [FakeUpstream.expected_content(MESSAGES)] * 4
    assert len(fake_upstream.requests_to(CHAT)) == 1  # tripped by its first failure; skipped from then on
    assert [r.model for r in second_upstream.requests_to(CHAT)] == ["backup-model"] * 4


def test_a_4xx_from_the_upstream_is_not_a_breaker_failure(client, fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=2)
    model_make("gpt-b", upstream)
    fake_upstream.fail_next(5, status=400)

    for _ in range(5):
        with pytest.raises(openai.BadRequestError):
            _chat(client)

    assert len(fake_upstream.requests_to(CHAT)) == 5
    assert breaker_view(_deployment_key("gpt-b", "fake")).state == "closed"
    assert _chat(client) == FakeUpstream.expected_content(MESSAGES)


def test_a_stream_that_breaks_off_counts_against_its_deployment(client, fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=1)
    model_make("gpt-b", upstream)
    key = _deployment_key("gpt-b", "fake")
    assert list(client.chat.completions.create(model="gpt-b", messages=MESSAGES, stream=True))
    assert breaker_view(key).state == "closed"  # a whole stream is a success

    fake_upstream.fail_mid_stream = 1
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="gpt-b", messages=MESSAGES, stream=True))

    deadline = time.monotonic() + WAIT_S  # the stream's end is reported as the relay finishes
    while breaker_view(key).state != "open":
        assert time.monotonic() < deadline, breaker_view(key)
        time.sleep(0.01)
    with pytest.raises(openai.APIStatusError) as refused:
        _chat(client)
    assert refused.value.status_code == 503
    assert len(fake_upstream.requests_to(CHAT)) == 2


def test_after_the_cooldown_a_successful_probe_closes_the_breaker(client, fake_upstream, live_gateway):
    upstream = upstream_make(
        base_url=fake_upstream.base_url, max_retries=0, breaker_failure_threshold=1, breaker_cooldown_s=0.3
    )
    model_make("gpt-b", upstream)
    key = _deployment_key("gpt-b", "fake")
    fake_upstream.fail_next(1, status=500)
    with pytest.raises(openai.InternalServerError):
        _chat(client)
    with pytest.raises(openai.APIStatusError):
        _chat(client)  # open: 503 without calling the fake
    assert len(fake_upstream.requests_to(CHAT)) == 1

    deadline = time.monotonic() + WAIT_S
    while breaker_view(key).state != "half_open":
        assert time.monotonic() < deadline, breaker_view(key)
        time.sleep(0.02)
    assert _chat(client) == FakeUpstream.expected_content(MESSAGES)  # the probe

    assert breaker_view(key).state == "closed"
    assert "breakers" not in httpx.get(live_gateway.url("/health/ready")).json()
    assert f'apiforge_breaker_state{{key="{key}"}} 0.0' in httpx.get(live_gateway.url("/metrics")).text


def test_least_in_flight_model_sends_calls_to_the_idle_deployment(client, fake_upstream, second_upstream):
    slow = upstream_make(name="slow", base_url=fake_upstream.base_url, max_retries=0)
    idle = upstream_make(name="idle", base_url=second_upstream.base_url, max_retries=0)
    model = model_make("gpt-b", slow, upstream_model="slow-model")
    Model.objects.filter(pk=model.pk).update(balancer="least_in_flight")
    Deployment.objects.create(model=model, upstream=idle, upstream_model="idle-model")
    fake_upstream.hang_next(1)
    hanging = threading.Thread(target=lambda: pytest.raises(openai.APIError, _chat, client), daemon=True)
    hanging.start()
    assert fake_upstream.wait_for_requests(1)  # the first call hangs on the slow deployment

    answers = [_chat(client) for _ in range(4)]

    assert answers == [FakeUpstream.expected_content(MESSAGES)] * 4
    assert len(second_upstream.requests_to(CHAT)) == 4
    fake_upstream.stop()  # ends the hanging call
    hanging.join(10)
