"""The one pooled HTTP client for upstream calls (aiohttp, chosen by measurement: see README).

One ``ClientSession`` per event loop (so one per worker process in production),
created on first use and closed at server shutdown. Keep-alive pooling, no
redirects, no proxy settings from the environment, timeouts always.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from django.conf import settings

_session: aiohttp.ClientSession | None = None
_session_loop: asyncio.AbstractEventLoop | None = None


def _new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.PROXY_POOL_SIZE,
        limit_per_host=settings.PROXY_POOL_PER_HOST,
        keepalive_timeout=settings.PROXY_KEEPALIVE_S,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.PROXY_CONNECT_TIMEOUT_S),
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
        raise_for_status=False,
    )


def upstream_session() -> aiohttp.ClientSession:
    """The pooled session of the running event loop."""
    global _session, _session_loop
    loop = asyncio.get_running_loop()
    if _session is None or _session_loop is not loop or _session.closed:
        _session = _new_session()
        _session_loop = loop
    return _session


async def upstream_session_close() -> None:
    """Close the pool (server shutdown)."""
    global _session, _session_loop
    if _session is not None and not _session.closed and _session_loop is asyncio.get_running_loop():
        await _session.close()
    _session = None
    _session_loop = None
