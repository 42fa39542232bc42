"""Call an ASGI application in-process, the way a server would: a real scope, ``receive`` and ``send``.

``asgi_request(app, method, path, body=..., headers=...)`` delivers the body (in one message or in
``chunks``), then reports ``http.disconnect`` only once the answer is complete (as a server does when the
client goes away after reading), and collects what the app sends. The whole exchange is bounded by
``timeout`` so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

App = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


@dataclass
class AsgiAnswer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


async def asgi_request(
    app: App,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    chunks: Sequence[bytes] | None = None,
    timeout: float = 10.0,
) -> AsgiAnswer:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    pieces = list(chunks) if chunks is not None else [body]
    complete = asyncio.Event()
    status: list[int] = []
    sent_headers: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert not status, "the response was started twice"
            status.append(message["status"])
            sent_headers.extend(message.get("headers", []))
        elif message["type"] == "http.response.body":
            assert status, "body sent before the response was started"
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete.set()

    await asyncio.wait_for(app(scope, receive, send), timeout)
    assert status, "the app returned without answering"
    assert complete.is_set(), "the app returned without finishing its answer"
    return AsgiAnswer(status[0], sent_headers, b"".join(parts))
