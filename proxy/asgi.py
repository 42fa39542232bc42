"""The lean ASGI path for ``/v1/`` (a thin adapter over ``proxy.edge``) and the seam that sends ``/gw/`` to the gateway.

``ProxyDispatcher`` is the one seam: it sends proxy paths to ``proxy_app`` and
everything else to Django. ``proxy_app`` reads the headers and the body through
``proxy.edge.ingress``, calls ``proxy.edge.pipeline.proxy_handle`` and writes the
answer. A streamed answer is relayed as it arrives while a watcher listens for the
client going away, which closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from apiforge.request_id import request_id_from, request_id_var
from proxy.edge.exchange import ProxyRequest, ProxyResponse, Receive, Scope, Send
from proxy.edge.gateway import gateway_app
from proxy.edge.ingress import (
    GATEWAY_PREFIX,
    OPENAI_PREFIX,
    answer_headers,
    body_read,
    ingress_refusal,
    request_headers,
)
from proxy.edge.pipeline import proxy_handle
from proxy.errors import internal_error

logger = logging.getLogger(__name__)


async def proxy_app(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI application for the proxy paths (HTTP only)."""
    api_key, incoming_id, content_length = request_headers(scope["headers"])
    request_id = request_id_from(incoming_id)
    token = request_id_var.set(request_id)
    try:
        # proxy_handle never raises; this guards the few steps around it (inline: no extra await per request).
        try:
            path = scope["path"]
            body = await body_read(receive, content_length)
            response = ingress_refusal(path, body)
            if response is None:
                request = ProxyRequest(
                    method=scope["method"],
                    path=path,
                    api_key=api_key,
                    # Behind a reverse proxy the server (uvicorn --forwarded-allow-ips) has already put the
                    # client's address here from X-Forwarded-For.
                    client_ip=scope["client"][0] if scope.get("client") else None,
                    request_id=request_id,
                    body=body or b"",
                )
                response = await proxy_handle(request)
        except Exception:
            logger.exception("unexpected error on the proxy path")
            response = ProxyResponse(500, internal_error().body())
        await _send(response, request_id.encode(), receive, send)
    finally:
        request_id_var.reset(token)


async def _send(response: ProxyResponse, request_id: bytes, receive: Receive, send: Send) -> None:
    try:
        await _send_answer(response, request_id, receive, send)
    finally:
        if response.closed is not None:
            response.closed()


async def _send_answer(response: ProxyResponse, request_id: bytes, receive: Receive, send: Send) -> None:
    headers = answer_headers(response, request_id)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if response.stream is None:
        await send({"type": "http.response.body", "body": response.body})
        return
    done = False

    async def watch_disconnect() -> None:
        message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()
        if not done and response.abort is not None:
            response.abort()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        async for chunk in response.stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        done = True
        await send({"type": "http.response.body", "body": b""})
    finally:
        done = True
        watcher.cancel()


class ProxyDispatcher:
    """The seam: ``/v1/`` takes the lean app (unless ``lean_openai`` is off: then Django's views serve it),
    ``/gw/`` the gateway (always: it streams both ways, which Django's request cycle cannot), the rest Django."""

    def __init__(self, django_app: Callable[..., Awaitable[None]], *, lean_openai: bool = True) -> None:
        self.django_app = django_app
        self.lean_openai = lean_openai

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(OPENAI_PREFIX) and self.lean_openai:
                await proxy_app(scope, receive, send)
                return
            if path.startswith(GATEWAY_PREFIX):
                await gateway_app(scope, receive, send)
                return
        await self.django_app(scope, receive, send)
