"""WebSockets go through Channels: `/ws/events/` reaches the live feed, a path no consumer serves is refused cleanly
(not with a server error)."""

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


@pytest.mark.django_db(transaction=True)
async def test_the_live_feed_is_routed_and_refuses_an_anonymous_socket_at_the_handshake():
    communicator = WebsocketCommunicator(
        application, "/ws/events/", headers=[(b"host", b"testserver"), (b"origin", b"http://testserver")]
    )
    connected, code = await communicator.connect(timeout=5)
    assert connected is False
    assert code != 4404  # the live feed's consumer answered (and refused), not the fallback
    await communicator.wait()
