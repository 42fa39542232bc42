"""The live server fixtures: ASGI apps under uvicorn on a real 127.0.0.1 socket."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.live_server import LiveServer, live_gateway, live_server_factory

__all__ = ["live_gateway", "live_server_factory"]


def _get(url: str) -> tuple[int, dict[str, str], Any]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - an http://127.0.0.1 URL
        return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())


def test_live_gateway_answers_health_with_a_request_id(live_gateway: LiveServer) -> None:
    status, headers, body = _get(live_gateway.url("/health"))

    assert status == 200
    assert headers["x-request-id"]
    assert body == {"status": "ok"}


def test_live_server_serves_an_asgi_app_and_frees_its_port_on_stop(
    live_server_factory: Callable[[Any], LiveServer],
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"path": scope["path"]}).encode()})

    server = live_server_factory(app)
    assert server.base_url == f"http://127.0.0.1:{server.port}"

    assert _get(server.url("/anything"))[2] == {"path": "/anything"}

    server.stop()
    with LiveServer(app, "127.0.0.1", server.port) as again:  # the port is free again at once
        assert _get(again.url("/x"))[2] == {"path": "/x"}
