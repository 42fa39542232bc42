"""The values every stage passes along: the request as the front doors read it, and the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

# ASGI's shapes, as the front doors (``proxy/asgi.py``, ``gateway``) use them.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Header = tuple[bytes, bytes]

JSON = b"application/json"
SSE = b"text/event-stream"


@dataclass(slots=True)
class ProxyRequest:
    method: str
    path: str
    api_key: str | None
    client_ip: str | None
    request_id: str
    body: bytes = b""


@dataclass(slots=True)
class ProxyResponse:
    status: int
    body: bytes = b""
    content_type: bytes = JSON
    stream: AsyncIterator[bytes] | None = None
    # Called when the client goes away mid-stream: closes the upstream connection.
    abort: Callable[[], None] | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Called once the answer is over however it ended (``proxy.asgi``): a stream's limits settle here when the
    # relay never ran (the client left before the first byte).
    closed: Callable[[], None] | None = None
