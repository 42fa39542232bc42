"""WebSocket routes (Channels): the staff live feed at ``/ws/events/``; any other path is refused.

A path no consumer serves is closed cleanly (close code 4404) instead of Channels raising "No route found",
which a server logs as an error with a traceback. ``apiforge.asgi`` wraps these routes in the session
authentication (``AuthMiddlewareStack``) the live feed's staff check reads.
"""

from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.urls import re_path

from gateway_stats.live import StaffEventsConsumer


class NoRouteConsumer(AsyncWebsocketConsumer):
    """Refuses a WebSocket that no route serves."""

    channel_layer_alias = None  # it never listens: no channel-layer subscription to set up and tear down

    async def connect(self) -> None:
        await self.close(code=4404)


websocket_urlpatterns: list[Any] = [
    re_path(r"^ws/events/$", StaffEventsConsumer.as_asgi()),
    re_path(r"", NoRouteConsumer.as_asgi()),
]
