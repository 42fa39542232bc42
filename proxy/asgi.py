"""Lean ASGI proxy path (placeholder until the proxy issue)."""

from typing import Any


class ProxyDispatcher:
    def __init__(self, django_app: Any) -> None:
        self.django_app = django_app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.django_app(scope, receive, send)


async def proxy_lifespan(scope: Any, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
