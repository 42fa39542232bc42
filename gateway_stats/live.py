"""The staff live feed: ``/ws/events/``, a WebSocket that forwards the event bus's group messages to staff.

``StaffEventsConsumer`` accepts a socket only from the gateway's own pages (its ``Origin`` is the host it
asked, or one of ``CSRF_TRUSTED_ORIGINS``: a cross-site page cannot open it with the staff's cookie) and only
for an active staff user of the admin session (``AuthMiddlewareStack``) who may view the request log
(``gateway_stats.view_usagerecord``, as the live page). Anyone else is closed before the handshake is
accepted, which the client sees as HTTP 403. An accepted socket joins the Channels group ``staff_events``
(``gateway_stats.events``) and gets each group message as one JSON frame ``{"topic": "usage" | "audit",
"events": [...]}``, for the topics it asked for (``?topics=usage,audit``; both by default). A usage event
gains the ``username`` of its ``user_id`` (looked up once per user and socket, in one query per batch): the
publisher's events carry ids only, so the proxy never reads the user table for the feed.

A slow or absent browser never slows the publisher: the publisher's ``group_send`` puts a message on each
member's channel, and a channel already holding its capacity (``CHANNEL_LAYERS`` ``capacity``, 100 messages
by default) drops it. Both layers do that without blocking and without telling the sender (the in-memory
layer swallows ``ChannelFull``; Redis's group script skips full channels and logs their count at INFO), so
those drops cannot be counted in ``apiforge_events_dropped_total``; what the publisher drops itself (queue
full, layer failing) is.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model

from gateway_stats.events import GROUP, TOPICS

PERMISSION = "gateway_stats.view_usagerecord"
USERNAMES_KEPT = 1000  # the usernames one socket remembers; past that it forgets them all and asks again


def scope_header(scope: dict[str, Any], name: bytes) -> str:
    """A request header of the handshake (the last one of that name), or ``""``."""
    value = b""
    for key, header in scope.get("headers", []):
        if key == name:
            value = header
    return value.decode("latin-1")


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether the handshake comes from a page of this site: its Origin is the host asked, or trusted."""
    origin = scope_header(scope, b"origin")
    if not origin:
        return False
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    host = scope_header(scope, b"host")
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def requested_topics(scope: dict[str, Any]) -> frozenset[str]:
    """The topics the socket asked for (``?topics=usage,audit``); unknown names are ignored, none means all."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    names = {name.strip() for value in query.get("topics", []) for name in value.split(",")}
    chosen = frozenset(names.intersection(TOPICS))
    return chosen or frozenset(TOPICS)


@database_sync_to_async
def staff_allowed(user: Any) -> bool:
    """Whether the session's user may watch the feed: active staff with the request log's view permission."""
    if user is None or not user.is_authenticated or not (user.is_active and user.is_staff):
        return False
    return bool(user.has_perm(PERMISSION))


@database_sync_to_async
def usernames_of(user_ids: set[int]) -> dict[int, str]:
    """The usernames of those users (a user deleted since is left out)."""
    users = get_user_model()
    return dict(users.objects.filter(pk__in=user_ids).values_list("pk", users.USERNAME_FIELD))


class StaffEventsConsumer(AsyncJsonWebsocketConsumer):
    """Forwards the ``staff_events`` group's usage and audit events to one staff user's browser."""

    topics: frozenset[str] = frozenset()
    joined = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usernames: dict[int, str | None] = {}

    async def connect(self) -> None:
        if not origin_allowed(self.scope) or not await staff_allowed(self.scope.get("user")):
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        self.topics = requested_topics(self.scope)
        await self.channel_layer.group_add(GROUP, self.channel_name)
        self.joined = True
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.channel_layer.group_discard(GROUP, self.channel_name)
            self.joined = False

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        """The feed only speaks: what the browser sends (JSON or not) is ignored."""

    async def usage_events(self, message: dict[str, Any]) -> None:
        if "usage" in self.topics:  # checked first: a socket that asked for audit only looks up no names
            await self.send_json({"topic": "usage", "events": await self._named(message["events"])})

    async def _named(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events, each with its user's ``username`` (``None`` without a user, or for one deleted since)."""
        unknown = {event["user_id"] for event in events if event.get("user_id") is not None} - self.usernames.keys()
        if unknown:
            if len(self.usernames) + len(unknown) > USERNAMES_KEPT:
                self.usernames.clear()
            found = await usernames_of(unknown)
            self.usernames.update({user_id: found.get(user_id) for user_id in unknown})
        return [{**event, "username": self._username(event.get("user_id"))} for event in events]

    def _username(self, user_id: int | None) -> str | None:
        return None if user_id is None else self.usernames.get(user_id)

    async def audit_events(self, message: dict[str, Any]) -> None:
        await self._forward("audit", message)

    async def _forward(self, topic: str, message: dict[str, Any]) -> None:
        if topic in self.topics:
            await self.send_json({"topic": topic, "events": message["events"]})
