"""A generic HTTP target for the gateway tests: a real aiohttp server on 127.0.0.1 (FakeUpstream's lifecycle).

Every path answers JSON describing the request it received (method, path, raw query, lower-case headers, body
size) unless a knob says otherwise:

- ``status``: the status of the answer (default 200); ``fail_next(n, status)``: the next ``n`` answers;
- ``GET /download/{n}``: ``n`` bytes streamed in 256 KiB chunks without a Content-Length (chunked); a
  client that goes away mid-way counts in ``disconnects`` and sets ``disconnected``;
- ``POST|PUT /upload``: the body read as it arrives, answered ``{"received": n, "sha256": ...}``;
- ``GET /health``: 200 while ``healthy`` is true, else 503;
- ``name``: included in every echo, to tell targets apart.

``calls`` counts the requests received (health probes apart, in ``health_calls``); ``seen`` holds the echoes.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from aiohttp import web

from tests.proxy.fake_upstream import FakeUpstream

DOWNLOAD_CHUNK = 256 * 1024


class EchoTarget(FakeUpstream):
    def __init__(self, name: str = "target") -> None:
        self.name = name
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.status = 200
        self.healthy = True
        self.calls = 0
        self.health_calls = 0
        self.seen: list[dict[str, Any]] = []
        self._fail: list[int] = []
        self.extra_headers: dict[str, str] = {}

    def fail_next(self, count: int = 1, status: int = 503) -> None:  # type: ignore[override]
        with self._lock:
            self._fail.extend([status] * count)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            self.health_calls += 1
            return web.json_response({"healthy": self.healthy}, status=200 if self.healthy else 503)
        self.calls += 1
        with self._lock:
            failure = self._fail.pop(0) if self._fail else None
        if failure is not None:
            await request.read()
            return web.json_response({"failed": True, "target": self.name}, status=failure)
        if request.path.startswith("/download/"):
            size = int(request.path.rsplit("/", 1)[1])
            response = web.StreamResponse(status=200, headers={"content-type": "application/octet-stream"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            chunk = b"x" * DOWNLOAD_CHUNK
            sent = 0
            try:
                while sent < size:
                    piece = chunk[: min(DOWNLOAD_CHUNK, size - sent)]
                    await response.write(piece)
                    sent += len(piece)
                await response.write_eof()
            except asyncio.CancelledError:
                self.disconnects += 1
                self.disconnected.set()
                raise
            except ConnectionError:  # aiohttp's ClientConnectionResetError too: the reader went away
                self.disconnects += 1
                self.disconnected.set()
            return response
        if request.path == "/upload":
            digest = hashlib.sha256()
            received = 0
            async for piece in request.content.iter_any():
                digest.update(piece)
                received += len(piece)
            return web.json_response({"received": received, "sha256": digest.hexdigest(), "target": self.name})
        body = await request.read()
        echo = {
            "target": self.name,
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_len": len(body),
            "body": body.decode("utf-8", "replace")[:1000],
        }
        self.seen.append(echo)
        return web.json_response(echo, status=self.status, headers=self.extra_headers)
