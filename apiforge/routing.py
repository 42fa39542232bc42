"""WebSocket routes (Channels). The live traffic feed (`/ws/events/`) joins here in its issue.

Until then every WebSocket path is refused cleanly (close code 4404) instead of Channels raising
"No route found", which a server logs as an error with a traceback.
"""

from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.urls import re_path


class NoRouteConsumer(AsyncWebsocketConsumer):
    """Refuses a WebSocket that no route serves."""

    channel_layer_alias = None  # it never listens: no channel-layer subscription to set up and tear down

    async def connect(self) -> None:
        await self.close(code=4404)


websocket_urlpatterns: list[Any] = [re_path(r"", NoRouteConsumer.as_asgi())]
