"""The fake OpenAI upstream itself, driven by the official ``openai`` client (no gateway in between)."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
from typing import Any

import openai
import pytest

from tests.proxy.fake_upstream import FakeUpstream

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the nice people"},
]


@pytest.fixture
def client(fake_upstream: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_upstream.base_url, api_key="sk-upstream-test", max_retries=0, timeout=5)


def test_chat_completion_echoes_the_last_user_message_with_exact_usage(
    fake_upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    answer = client.chat.completions.create(model="upstream-model", messages=MESSAGES)

    assert answer.object == "chat.completion"
    assert answer.model == "upstream-model"
    assert answer.choices[0].message.content == "echo: Say hello to the nice people"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": 9,
        "completion_tokens": 7,
        "total_tokens": 16,
    }
    assert FakeUpstream.expected_usage(MESSAGES) == {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
    received = fake_upstream.last_request
    assert (received.method, received.path, received.model) == ("POST", "/v1/chat/completions", "upstream-model")
    assert received.headers["authorization"] == "Bearer sk-upstream-test"
    assert received.json["messages"] == MESSAGES
    assert received.status == 200


def test_stream_without_include_usage_has_role_content_and_finish_chunks_only(
    fake_upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    fake_upstream.chunks = 5

    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))

    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 7
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:6]] == FakeUpstream.expected_chunks(MESSAGES, 5)
    assert "".join(FakeUpstream.expected_chunks(MESSAGES, 5)) == FakeUpstream.expected_content(MESSAGES)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert fake_upstream.last_request.stream


def test_stream_with_include_usage_ends_with_a_usage_chunk(fake_upstream: FakeUpstream, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )

    assert len(chunks) == 1 + 3 + 1 + 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == FakeUpstream.expected_usage(MESSAGES)["total_tokens"]


def test_stream_body_is_server_sent_events_ending_with_done(fake_upstream: FakeUpstream) -> None:
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    url = fake_upstream.base_url + "/chat/completions"
    request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 - an http://127.0.0.1 URL

    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - an http://127.0.0.1 URL
        content_type = response.headers["content-type"]
        raw = response.read().decode()

    assert content_type == "text/event-stream"
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 3 + 1 + 1


def test_streamed_chunks_are_sent_chunk_delay_apart(fake_upstream: FakeUpstream, client: openai.OpenAI) -> None:
    fake_upstream.chunks, fake_upstream.chunk_delay = 3, 0.1
    arrivals = []
    started = time.monotonic()

    for _ in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
        arrivals.append(time.monotonic() - started)

    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(gaps) == 4  # role, 3 contents, finish: each 0.1 s after the one before
    assert min(gaps) > 0.05


def test_completions_and_their_stream(fake_upstream: FakeUpstream, client: openai.OpenAI) -> None:
    answer = client.completions.create(model="m", prompt="tell me more")
    streamed = list(
        client.completions.create(model="m", prompt="tell me more", stream=True, stream_options={"include_usage": True})
    )

    assert answer.choices[0].text == "echo: tell me more"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 3
    assert answer.usage.completion_tokens == 4
    assert FakeUpstream.expected_completion_usage("tell me more")["total_tokens"] == 7
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "echo: tell me more"
    assert streamed[-1].usage is not None
    assert streamed[-1].usage.total_tokens == 7


@pytest.mark.parametrize("encoding_format", ["float", None])  # None: the SDK asks for base64 and decodes it
def test_embeddings_are_deterministic_with_exact_usage(
    fake_upstream: FakeUpstream, client: openai.OpenAI, encoding_format: str | None
) -> None:
    extra = {"encoding_format": encoding_format} if encoding_format else {}

    answer = client.embeddings.create(model="embed", input=["one two", "three"], **extra)

    assert [e.embedding for e in answer.data] == [
        FakeUpstream.expected_embedding("one two"),
        FakeUpstream.expected_embedding("three"),
    ]
    assert len(answer.data[0].embedding) == 8
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 3
    assert FakeUpstream.expected_embedding_usage(["one two", "three"]) == {"prompt_tokens": 3, "total_tokens": 3}
    assert fake_upstream.last_request.model == "embed"


def test_models_list_and_unknown_model(fake_upstream: FakeUpstream, client: openai.OpenAI) -> None:
    fake_upstream.models = ["gpt-fake", "embed-fake"]

    assert [m.id for m in client.models.list()] == ["gpt-fake", "embed-fake"]
    assert client.models.retrieve("gpt-fake").id == "gpt-fake"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_fail_next_answers_the_next_requests_with_an_openai_error(
    fake_upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    fake_upstream.fail_next(2, status=503)
    fake_upstream.fail_next(1, status=429, body={"error": {"message": "slow down", "type": "rate_limit"}})

    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="m", messages=MESSAGES)
        assert failed.value.status_code == 503
        assert failed.value.body["type"] == "server_error"
    with pytest.raises(openai.RateLimitError, match="slow down"):
        client.chat.completions.create(model="m", messages=MESSAGES)

    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
    assert [r.status for r in fake_upstream.requests] == [503, 503, 429, 200]


def test_fail_mid_stream_breaks_the_connection_after_k_chunks(
    fake_upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    fake_upstream.fail_mid_stream = 1
    received: list[Any] = []

    def read_all() -> None:
        received.extend(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))

    with pytest.raises(openai.APIConnectionError):  # the SDK wraps httpx's "incomplete chunked read"
        read_all()

    assert [c.choices[0].delta.content for c in received] == ["", FakeUpstream.expected_chunks(MESSAGES)[0]]


def test_client_going_away_mid_stream_is_seen(fake_upstream: FakeUpstream, client: openai.OpenAI) -> None:
    fake_upstream.chunks, fake_upstream.chunk_delay = 50, 0.05
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = iter(stream)
    next(chunks)
    next(chunks)

    stream.close()

    assert fake_upstream.wait_for_disconnect(timeout=5)
    assert fake_upstream.disconnects == 1
    assert fake_upstream.last_request.disconnected


def test_a_complete_answer_is_not_a_disconnect(fake_upstream: FakeUpstream, client: openai.OpenAI) -> None:
    list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    client.chat.completions.create(model="m", messages=MESSAGES)

    assert not fake_upstream.disconnected.wait(0.2)
    assert fake_upstream.disconnects == 0


def test_hang_next_keeps_the_client_waiting_until_it_gives_up(
    fake_upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    fake_upstream.hang_next(1)
    started = time.monotonic()

    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(model="m", messages=MESSAGES)

    assert 0.25 <= time.monotonic() - started < 3
    assert fake_upstream.wait_for_disconnect(timeout=5)  # the fake saw the client give up
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content


def test_stop_ends_a_hanging_answer_at_once() -> None:
    upstream = FakeUpstream().start()
    upstream.hang_next(1)
    client = openai.OpenAI(base_url=upstream.base_url, api_key="k", max_retries=0, timeout=30)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.chat.completions.create(model="m", messages=MESSAGES)
        except openai.APIError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert upstream.wait_for_requests(1, timeout=5)
    started = time.monotonic()

    upstream.stop()
    caller.join(5)

    assert time.monotonic() - started < 3
    assert not caller.is_alive()
    assert errors  # a 503 or a dropped connection, but never a hang


def test_latency_delays_the_answer_and_reset_restores_defaults(
    fake_upstream: FakeUpstream, client: openai.OpenAI
) -> None:
    fake_upstream.latency = 0.2
    fake_upstream.chunks = 7
    started = time.monotonic()
    client.embeddings.create(model="e", input="x")
    assert time.monotonic() - started >= 0.2

    fake_upstream.reset()

    assert (fake_upstream.latency, fake_upstream.chunks, fake_upstream.requests) == (0.0, 3, [])
    assert fake_upstream.disconnects == 0
