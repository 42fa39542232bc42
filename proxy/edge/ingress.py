"""Ingress: the front door both adapters share (the lean ASGI app and the Django views).

What is read of a request: the presented key (``Authorization: Bearer``, ``x-api-key``, ``api-key``),
the incoming request id and the declared body length, from the raw header pairs; what is refused before
the pipeline (a body over the limit); and the headers of the answer,
SSE ones included.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from django.conf import settings

from proxy.edge.exchange import ProxyResponse
from proxy.errors import ProxyError

OPENAI_PREFIX = "/v1/"
GATEWAY_PREFIX = "/gw/"
_KEY_HEADERS = (b"x-api-key", b"api-key")
_SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
_MAX_LENGTH_DIGITS = 19

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def request_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, bytes | None, int]:
    """The presented API key, the incoming ``x-request-id`` and the declared ``content-length`` (0 if none).

    A Bearer token wins over ``x-api-key`` / ``api-key``; of those two, the first sent.
    """
    api_key: str | None = None
    incoming_id: bytes | None = None
    content_length = 0
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == b"bearer ":
                api_key = value[7:].strip().decode("latin-1")
        elif name in _KEY_HEADERS:
            api_key = api_key or value.strip().decode("latin-1")
        elif name == b"content-length":
            if value.isdigit():
                # More digits than any limit allows count as too large (int() refuses over 4300 digits anyway).
                content_length = int(value) if len(value) < _MAX_LENGTH_DIGITS else sys.maxsize
            else:
                content_length = 0
        elif name == b"x-request-id":
            incoming_id = value
    return api_key, incoming_id, content_length


async def body_read(receive: Receive, content_length: int) -> bytes | None:
    """An ASGI request's body, or None when it exceeds ``PROXY_MAX_BODY_BYTES`` (or the client left)."""
    limit: int = settings.PROXY_MAX_BODY_BYTES
    if content_length > limit:
        return None
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def ingress_refusal(path: str, body: bytes | None) -> ProxyResponse | None:
    """The answer when the request goes no further than the front door (``body`` None: over the limit)."""
    if body is None:
        limit = settings.PROXY_MAX_BODY_BYTES
        error = ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        return ProxyResponse(413, error.body())
    return None


def answer_headers(response: ProxyResponse, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """The answer's headers: type, request id, the error's own (Retry-After), then length or SSE ones."""
    headers = [(b"content-type", response.content_type), (b"x-request-id", request_id), *response.headers]
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
    else:
        headers.extend(_SSE_HEADERS)
    return headers
