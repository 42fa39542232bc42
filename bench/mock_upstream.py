"""A fast fake OpenAI upstream for ``bench/run.py``: a raw ASGI app served by uvicorn (uvloop + httptools).

``POST /v1/chat/completions`` answers JSON with a ``usage`` block, or with
``"stream": true`` an SSE stream: a role chunk, ``--chunks`` content chunks, a
finish chunk, a usage chunk when ``stream_options.include_usage`` is set, then
``data: [DONE]``. ``GET /v1/models`` and ``GET /health`` answer too; the ``/v1``
prefix is optional. A last user message ``bench:chunk_delay_ms=N`` spaces the
content chunks N ms apart, which lets ``run.py`` tell streaming from buffering
through any proxy (proxies forward messages untouched).

No framework and precomputed bytes wherever possible: the upstream must stay far
faster than the gateway under test, or the benchmark measures the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CHUNKS = int(os.environ.get("BENCH_MOCK_CHUNKS", "8"))
DELAY_MARK = "bench:chunk_delay_ms="
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
_MODELS = orjson.dumps(
    {"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 1700000000, "owned_by": "bench"}]}
)
_NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":"not_found"}}'
_ids = itertools.count(1)


def _usage(completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": 9 + completion_tokens}


async def _body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    return body


async def _answer(send: Send, status: int, body: bytes, content_type: tuple[bytes, bytes] = _JSON) -> None:
    headers = [content_type, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _chunk_delay(request: dict[str, Any]) -> float:
    messages = request.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        if isinstance(content, str) and content.startswith(DELAY_MARK):
            return float(content[len(DELAY_MARK) :]) / 1000
    return 0.0


async def _chat(receive: Receive, send: Send) -> None:
    try:
        request = orjson.loads(await _body(receive))
    except orjson.JSONDecodeError:
        await _answer(send, 400, b'{"error":{"message":"invalid json","type":"invalid_request_error"}}')
        return
    head = {"id": f"chatcmpl-bench{next(_ids)}", "created": int(time.time()), "model": request.get("model", "")}
    if not request.get("stream"):
        message = {"role": "assistant", "content": " ".join(["hello"] * CHUNKS)}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        answer = {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(CHUNKS)}
        await _answer(send, 200, orjson.dumps(answer))
        return
    head["object"] = "chat.completion.chunk"
    delay = _chunk_delay(request)

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    await send({"type": "http.response.body", "body": event({"role": "assistant", "content": ""}), "more_body": True})
    for index in range(CHUNKS):
        if delay:
            await asyncio.sleep(delay)
        content = {"content": "hello " if index < CHUNKS - 1 else "hello"}
        await send({"type": "http.response.body", "body": event(content), "more_body": True})
    tail = event({}, "stop")
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        tail += b"data: " + orjson.dumps({**head, "choices": [], "usage": _usage(CHUNKS)}) + b"\n\n"
    await send({"type": "http.response.body", "body": tail + _DONE})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application (``bench.mock_upstream:app``)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"].removeprefix("/v1")
    if path == "/chat/completions" and scope["method"] == "POST":
        await _chat(receive, send)
    elif path == "/models":
        await _answer(send, 200, _MODELS)
    elif path == "/health":
        await _answer(send, 200, b"ok", (b"content-type", b"text/plain"))
    else:
        await _answer(send, 404, _NOT_FOUND)


def main() -> None:
    global CHUNKS
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunks", type=int, default=CHUNKS, help="content chunks per stream (default 8)")
    args = parser.parse_args()
    CHUNKS = args.chunks
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
