"""WebSockets go through Channels; a path no consumer serves is refused cleanly, not with a server error."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator

from apiforge.asgi import application


@pytest.mark.django_db(transaction=True)
async def test_unrouted_websocket_is_closed_with_4404():
    communicator = WebsocketCommunicator(application, "/ws/nothing-here/")
    connected, code = await communicator.connect(timeout=5)
    assert connected is False
    assert code == 4404
    await communicator.wait()
