"""A bare forwarding proxy for comparing upstream HTTP clients, not part of the gateway.

A raw ASGI app that sends ``POST /v1/chat/completions`` on to ``BENCH_UPSTREAM``
(e.g. ``http://127.0.0.1:9100/v1``) with ``BENCH_CLIENT`` = ``aiohttp`` or
``httpx``: one pooled client per process, the answer read whole or, for
``"stream": true``, relayed piece by piece. No auth, no parsing beyond the
``stream`` flag, no usage: whatever separates two runs is the client. Serve it
like the gateway and measure it with ``run.py --against``::

    BENCH_CLIENT=httpx BENCH_UPSTREAM=http://127.0.0.1:9100/v1 taskset -c 0 \\
        .venv/bin/uvicorn --app-dir bench client_forwarder:app --port 8200 \\
        --loop uvloop --http httptools --lifespan on --no-access-log
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CLIENT = os.environ.get("BENCH_CLIENT", "aiohttp")
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9100/v1").rstrip("/")
POOL = 1000
_HEADERS = {"content-type": "application/json", "user-agent": "bench"}
_client: Any = None


class _Aiohttp:
    def __init__(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=POOL, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30), cookie_jar=aiohttp.DummyCookieJar()
        )

    async def post(self, url: str, body: bytes) -> tuple[int, bytes]:
        async with self.session.post(url, data=body, headers=_HEADERS) as answer:
            return answer.status, await answer.read()

    async def stream(self, url: str, body: bytes) -> AsyncIterator[bytes]:
        async with self.session.post(url, data=body, headers=_HEADERS) as answer:
            async for piece in answer.content.iter_any():
                yield piece

    async def close(self) -> None:
        await self.session.close()


class _Httpx:
    def __init__(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL, keepalive_expiry=30)
        self.client = httpx.AsyncClient(limits=limits, timeout=30)

    async def post(self, url: str, body: bytes) -> tuple[int, bytes]:
        answer = await self.client.post(url, content=body, headers=_HEADERS)
        return answer.status_code, answer.content

    async def stream(self, url: str, body: bytes) -> AsyncIterator[bytes]:
        async with self.client.stream("POST", url, content=body, headers=_HEADERS) as answer:
            async for piece in answer.aiter_raw():
                yield piece

    async def close(self) -> None:
        await self.client.aclose()


async def _body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    return body


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    global _client
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _client = _Httpx() if CLIENT == "httpx" else _Aiohttp()
                await send({"type": "lifespan.startup.complete"})
            else:
                await _client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = await _body(receive)
    url = UPSTREAM + scope["path"].removeprefix("/v1")
    if not orjson.loads(body).get("stream"):
        status, answer = await _client.post(url, body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    async for piece in _client.stream(url, body):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
