"""The ``mock`` upstream kind: deterministic OpenAI-shaped answers made locally.

It echoes the last user message, counts tokens as whitespace-separated words,
and streams in several chunks, so the whole flow (keys, scopes, usage, SSE)
can be demonstrated and tested without any upstream server. Like a real
upstream it gets only bodies ``proxy.edge.payload`` has validated (field types, depth).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

STREAM_CHUNKS = 4


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("content") or value.get("text") or "")
    return 0


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def mock_answer(endpoint: str, payload: dict[str, Any], model: str) -> dict[str, Any]:
    """The full (non-streamed) answer for ``endpoint``."""
    created = int(time.time())
    if endpoint == "embeddings":
        inputs = payload.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for index, item in enumerate(items):
            digest = hashlib.sha256(str(item).encode()).digest()
            data.append({"object": "embedding", "index": index, "embedding": [b / 255 for b in digest[:8]]})
        tokens = _words([str(item) for item in items])
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    if endpoint == "completions":
        prompt = payload.get("prompt", "")
        text = f"echo: {prompt if isinstance(prompt, str) else ' '.join(map(str, prompt))}"
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": _usage(_words(prompt), _words(text)),
        }
    messages = payload.get("messages") or []
    text = f"echo: {_last_user_text(messages)}"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": _usage(_words(messages), _words(text)),
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def mock_stream(endpoint: str, payload: dict[str, Any], model: str) -> AsyncIterator[bytes]:
    """The answer as Server-Sent Events, with a usage chunk (the caller strips it when not asked for).

    The answer is made here, before the caller sends a status: a payload the mock cannot answer fails
    while the proxy can still say so, not after a 200 as a dropped connection.
    """
    return _events(endpoint, mock_answer(endpoint, payload, model), model)


async def _events(endpoint: str, answer: dict[str, Any], model: str) -> AsyncIterator[bytes]:
    usage = answer["usage"]
    base = {"id": answer["id"], "created": answer["created"], "model": model}
    if endpoint == "completions":
        text = answer["choices"][0]["text"]
        base["object"] = "text_completion"
        delta = lambda piece: {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}  # noqa: E731
    else:
        text = answer["choices"][0]["message"]["content"]
        base["object"] = "chat.completion.chunk"
        delta = lambda piece: {"index": 0, "delta": {"content": piece}, "finish_reason": None}  # noqa: E731
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    words = text.split(" ")
    size = max(1, -(-len(words) // STREAM_CHUNKS))
    for start in range(0, len(words), size):
        piece = " ".join(words[start : start + size])
        yield _sse({**base, "choices": [delta(piece if start == 0 else " " + piece)]})
    finish = delta("")
    finish["finish_reason"] = "stop"
    if "delta" in finish:
        finish["delta"] = {}
    yield _sse({**base, "choices": [finish]})
    yield _sse({**base, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"
