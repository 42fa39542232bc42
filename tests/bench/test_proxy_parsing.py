"""The proxy's per-request parsing: the request body, and usage found in the streamed answer."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway_stats.usage import UsageEvent
from proxy.edge.payload import payload_parse
from proxy.edge.relay import relay_stream, usage_in

pytestmark = pytest.mark.bench

CHAT_BODY = orjson.dumps(
    {
        "model": "bench-model",
        "max_tokens": 16,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Say hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-x"}


def _event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _delta(content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    return _event({**HEAD, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE = {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}
# The last network read of a typical stream: finish chunk, usage-only chunk, [DONE].
STREAM_TAIL = _delta(None, "stop") + _event({**HEAD, "choices": [], "usage": USAGE}) + b"data: [DONE]\n\n"
# A whole 8-chunk stream as an upstream sends it, one piece per event.
STREAM_PIECES = [_delta("")] + [_delta("hello ") for _ in range(8)] + [STREAM_TAIL]


def test_parse_body_of_a_chat_request(benchmark):
    payload = benchmark(payload_parse, CHAT_BODY, "messages")
    assert payload["model"] == "bench-model"


def test_usage_in_the_last_stream_events_is_noted_and_the_usage_chunk_dropped(benchmark):
    record = UsageEvent(request_id="r", endpoint="/v1/chat/completions", status=200)
    kept = benchmark(usage_in, STREAM_TAIL, record, False)
    assert (record.prompt_tokens, record.completion_tokens) == (9, 8)
    assert b'"usage"' not in kept
    assert kept.endswith(b"data: [DONE]\n\n")


def test_relay_of_a_whole_eight_chunk_stream(benchmark):
    """The relay generator over a complete stream (event loop overhead included, one loop for all rounds)."""

    async def pieces():
        for piece in STREAM_PIECES:
            yield piece

    async def relay_all() -> tuple[bytes, UsageEvent]:
        record = UsageEvent(request_id="r", endpoint="/v1/chat/completions", status=0)
        out = [chunk async for chunk in relay_stream(pieces(), record, 0.0, True)]
        return b"".join(out), record

    loop = asyncio.new_event_loop()
    try:
        body, record = benchmark(lambda: loop.run_until_complete(relay_all()))
    finally:
        loop.close()
    assert body == b"".join(STREAM_PIECES)
    assert record.completion_tokens == 8
