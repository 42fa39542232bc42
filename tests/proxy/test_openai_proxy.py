"""The OpenAI-compatible proxy through the official ``openai`` client, against a live gateway and a fake upstream."""

from __future__ import annotations

import logging
import time
from decimal import Decimal

import httpx
import openai
import pytest

from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there proxy"}]
UPSTREAM_SECRET = "sk-upstream-very-secret-0123456789"


@pytest.fixture
def setup(live_gateway, fake_upstream):
    """A gateway, a fake upstream holding a credential, one model ``gpt-test`` on it and a key for it."""
    upstream = upstream_make(base_url=fake_upstream.base_url, api_key=UPSTREAM_SECRET, timeout_s=5, max_retries=1)
    model = model_make("gpt-test", upstream, upstream_model="fake-model-1")
    key = key_make()
    client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0, timeout=10)
    return type("Setup", (), {"upstream": upstream, "model": model, "key": key, "client": client})


def test_chat_completion_is_forwarded_with_the_upstream_model_and_credential(setup, fake_upstream, usage):
    answer = setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    assert answer.choices[0].message.content == FakeUpstream.expected_content(MESSAGES)
    sent = fake_upstream.last_request
    assert sent.json["model"] == "fake-model-1"
    assert sent.json["messages"] == MESSAGES
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    expected = FakeUpstream.expected_usage(MESSAGES)
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    [record] = usage.flushed()
    assert (record.prompt_tokens, record.completion_tokens) == (
        expected["prompt_tokens"],
        expected["completion_tokens"],
    )
    assert (
        record.cost
        == (
            Decimal(expected["prompt_tokens"]) * Decimal("0.5")
            + Decimal(expected["completion_tokens"]) * Decimal("1.5")
        )
        / 1000
    )
    assert record.status == 200
    assert record.key_id == setup.key.pk
    assert record.user_id == setup.key.owner_id
    assert (record.model, record.upstream, record.upstream_model) == ("gpt-test", "fake", "fake-model-1")
    assert record.latency_ms > 0
    setup.key.refresh_from_db()
    assert setup.key.last_used_at is not None, "the usage hand-off notes when the key was last used"


def test_streamed_chat_relays_every_chunk_and_records_usage_without_showing_it_unasked(setup, fake_upstream, usage):
    fake_upstream.chunks = 4
    chunks = list(setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True))

    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content == FakeUpstream.expected_chunks(MESSAGES, chunks=4)
    assert all(c.usage is None for c in chunks), "the client did not ask for usage"
    assert fake_upstream.last_request.json["stream_options"] == {"include_usage": True}
    [record] = usage.flushed()
    expected = FakeUpstream.expected_usage(MESSAGES)
    assert (record.prompt_tokens, record.completion_tokens) == (
        expected["prompt_tokens"],
        expected["completion_tokens"],
    )
    assert record.stream is True
    assert record.status == 200
    assert 0 < record.ttfb_ms <= record.latency_ms


def test_streamed_chat_passes_the_usage_chunk_when_the_client_asks(setup, usage):
    chunks = list(
        setup.client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0].usage.total_tokens == FakeUpstream.expected_usage(MESSAGES)["total_tokens"]
    [record] = usage.flushed()
    assert record.total_tokens == usage_chunks[0].usage.total_tokens


def test_stream_has_sse_headers_and_ends_with_done(setup, live_gateway):
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST",
        live_gateway.url("/v1/chat/completions"),
        json=body,
        headers={"Authorization": f"Bearer {setup.key.secret}", "x-request-id": "trace-42"},
    ) as response:
        raw = b"".join(response.iter_bytes())
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-request-id"] == "trace-42"
    assert raw.endswith(b"data: [DONE]\n\n")


def test_streaming_really_streams_first_chunk_before_the_upstream_finishes(setup, fake_upstream):
    fake_upstream.chunks = 5
    fake_upstream.chunk_delay = 0.2
    started = time.monotonic()
    arrivals = []
    for chunk in setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    # The upstream spaces its 5 chunks 200 ms apart: a buffering proxy would deliver them all at once.
    assert arrivals[-1] - arrivals[0] >= 0.6


def test_completions_and_embeddings(setup, fake_upstream, usage):
    completion = setup.client.completions.create(model="gpt-test", prompt="say something")
    assert completion.choices[0].text == FakeUpstream.expected_completion_text("say something")

    embedding = setup.client.embeddings.create(model="gpt-test", input=["one two", "three"], encoding_format="float")
    assert [d.embedding for d in embedding.data] == [
        pytest.approx(FakeUpstream.expected_embedding("one two")),
        pytest.approx(FakeUpstream.expected_embedding("three")),
    ]
    assert fake_upstream.requests_to("/v1/embeddings")[0].json["model"] == "fake-model-1"
    records = usage.flushed()
    assert [r.endpoint for r in records] == ["/v1/completions", "/v1/embeddings"]
    assert records[0].prompt_tokens == FakeUpstream.expected_completion_usage("say something")["prompt_tokens"]
    assert records[1].prompt_tokens == FakeUpstream.expected_embedding_usage(["one two", "three"])["prompt_tokens"]


def test_models_list_shows_only_the_models_the_key_may_use(live_gateway, fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url)
    for name in ("alpha", "beta", "gamma"):
        model_make(name, upstream)
    scoped = key_make(allowed_models=["alpha", "gamma"])
    unscoped = key_make()

    def names(key):
        client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0)
        return [m.id for m in client.models.list()]

    assert names(scoped) == ["alpha", "gamma"]
    assert names(unscoped) == ["alpha", "beta", "gamma"]
    client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=scoped.secret, max_retries=0)
    assert client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.PermissionDeniedError):
        client.models.retrieve("beta")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_mock_upstream_kind_answers_locally_streamed_and_not(live_gateway, usage):
    upstream = upstream_make(name="mock", kind="mock")
    model_make("demo", upstream, upstream_model="demo")
    key = key_make()
    client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0)

    answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "ping pong"}])
    assert answer.choices[0].message.content == "echo: ping pong"
    assert answer.usage.prompt_tokens == 2

    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "one two three four five"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three four five"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].usage.completion_tokens == 6
    embedding = client.embeddings.create(model="demo", input="hi")
    assert len(embedding.data[0].embedding) == 8
    assert [r.status for r in usage.flushed()] == [200, 200, 200]


def test_upstream_500_is_retried_then_falls_back_to_the_next_model(live_gateway, fake_upstream, usage):
    broken = FakeUpstream().start()
    try:
        bad = upstream_make(name="broken", base_url=broken.base_url, max_retries=2)
        good = upstream_make(name="good", base_url=fake_upstream.base_url)
        model_make("backup", good, upstream_model="backup-upstream")
        model_make("primary", bad, fallbacks=["backup"])
        broken.fail_next(10, status=500)
        key = key_make(allowed_models=["primary"])
        client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0)

        answer = client.chat.completions.create(model="primary", messages=MESSAGES)

        assert answer.choices[0].message.content == FakeUpstream.expected_content(MESSAGES)
        assert len(broken.requests) == 3, "one try and two retries on the failing upstream"
        assert fake_upstream.last_request.json["model"] == "backup-upstream"
        [record] = usage.flushed()
        assert (record.model, record.upstream, record.status) == ("backup", "good", 200)
    finally:
        broken.stop()


def test_upstream_keeps_failing_gives_502_with_its_message(setup, fake_upstream):
    fake_upstream.fail_next(5, status=503, body={"error": {"message": "overloaded, try later", "type": "server"}})
    with pytest.raises(openai.InternalServerError) as caught:
        setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "overloaded, try later" in caught.value.body["message"]
    assert caught.value.body["code"] == "upstream_error"
    assert len(fake_upstream.requests) == 2, "max_retries=1: two tries"


def test_upstream_client_error_is_passed_on_without_retry(setup, fake_upstream):
    fake_upstream.fail_next(1, status=400, body={"error": {"message": "max_tokens is too large", "type": "x"}})
    with pytest.raises(openai.BadRequestError) as caught:
        setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.body["message"] == "max_tokens is too large"
    assert len(fake_upstream.requests) == 1


def test_upstream_timeout_gives_504(live_gateway, fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url, timeout_s=0.3, max_retries=0)
    model_make("slow", upstream)
    key = key_make()
    fake_upstream.hang_next(1)
    client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="slow", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "upstream_timeout"


def test_unreachable_upstream_gives_502(live_gateway):
    upstream = upstream_make(base_url="http://127.0.0.1:9/v1", max_retries=1)
    model_make("nowhere", upstream)
    key = key_make()
    client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="nowhere", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "Could not reach" in caught.value.body["message"]


def test_upstream_failure_mid_stream_ends_the_stream_with_an_error_event(setup, fake_upstream, usage):
    fake_upstream.chunks = 5
    fake_upstream.fail_mid_stream = 2
    received = []

    def consume():
        for chunk in setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True):
            received.append(chunk)

    with pytest.raises(openai.APIError) as caught:
        consume()
    assert "broke off" in str(caught.value)
    assert received, "the chunks before the failure were relayed"
    [record] = usage.flushed()
    assert record.status == 502


def test_client_disconnect_cancels_the_upstream_call(setup, fake_upstream, usage):
    fake_upstream.chunks = 50
    fake_upstream.chunk_delay = 0.1
    stream = setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    next(iter(stream))
    stream.close()
    assert fake_upstream.wait_for_disconnect(timeout=5), "the upstream saw the proxy hang up"
    deadline = time.monotonic() + 5
    records = usage.flushed()
    while not records and time.monotonic() < deadline:
        time.sleep(0.05)
        records = usage.flushed()
    assert [r.status for r in records] == [499]


def test_upstream_credential_never_appears_in_answers_or_logs(setup, fake_upstream, live_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    fake_upstream.fail_next(1, status=401, body={"error": {"message": f"bad key {UPSTREAM_SECRET}"}})
    with pytest.raises(openai.InternalServerError) as caught:
        setup.client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert UPSTREAM_SECRET not in str(caught.value.body)
    listing = httpx.get(live_gateway.url("/v1/models"), headers={"Authorization": f"Bearer {setup.key.secret}"})
    assert UPSTREAM_SECRET not in listing.text
    assert all(UPSTREAM_SECRET not in record.getMessage() for record in caplog.records)
