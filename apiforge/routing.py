"""WebSocket routes (Channels). The live traffic feed joins here in its issue."""

from typing import Any

websocket_urlpatterns: list[Any] = []
