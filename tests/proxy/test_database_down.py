"""The proxy with its database unreachable: it serves what its caches hold and answers 503 for the rest.

Nothing is mocked: ``database_unreachable()`` points the default connection at a place no database is
(a port nothing listens on for PostgreSQL, a file in a missing directory for SQLite) and drops the
connections the proxy's worker thread holds, so the next query really fails to connect; it puts the
settings back and reconnects afterwards. The tests are async and drive both front doors in-process (the
lean ASGI app, Django's views through ``AsyncClient``), so the proxy's database work runs in asgiref's
worker thread while the test database stays open in the main thread (an in-memory SQLite database lives
as long as one connection to it does).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient

from apiforge.local_cache import local_caches_clear
from proxy.asgi import proxy_app
from proxy.catalog import catalog_get, catalog_invalidate
from tests.proxy.asgi_client import asgi_request
from tests.proxy.helpers import key_make, model_make, upstream_make

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})


def _drop_connection() -> None:
    connection = connections["default"]
    connection.close()
    if connection.vendor == "postgresql":
        # A new pool is made from the settings at the next connection (and the old one stops).
        connection.close_pool()


@asynccontextmanager
async def database_unreachable(tmp_path: Path) -> AsyncIterator[None]:
    connection = connections["default"]
    # Every thread's connection shares this dict: a change reaches each at its next connect.
    settings_dict = connection.settings_dict
    saved = copy.deepcopy(settings_dict)
    if connection.vendor == "sqlite":
        settings_dict["NAME"] = str(tmp_path / "missing" / "db.sqlite3")
    else:
        settings_dict["HOST"], settings_dict["PORT"] = "127.0.0.1", "1"
        pool = settings_dict["OPTIONS"].get("pool")
        if pool:
            # Wait for a connection the pool will never get for half a second, not the production 5 s.
            settings_dict["OPTIONS"]["pool"] = {**(pool if isinstance(pool, dict) else {}), "timeout": 0.5}
    await sync_to_async(_drop_connection)()
    try:
        yield
    finally:
        settings_dict.clear()
        settings_dict.update(saved)
        await sync_to_async(_drop_connection)()


@pytest.fixture
def demo() -> Any:
    upstream = upstream_make(name="mock", kind="mock")
    model_make("demo", upstream, upstream_model="demo")
    first = key_make()
    return first, key_make(owner=first.owner)


def _bearer(key: Any) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key.secret}".encode()), (b"content-type", b"application/json")]


Answer = tuple[int, dict[str, str], Any]


async def _lean(key: Any, path: str = "/v1/chat/completions", method: str = "POST") -> Answer:
    answer = await asgi_request(proxy_app, method, path, body=CHAT if method == "POST" else b"", headers=_bearer(key))
    return answer.status, {k.decode(): v.decode() for k, v in answer.headers}, answer.json()


async def _django(key: Any, path: str = "/v1/chat/completions", method: str = "POST") -> Answer:
    client = AsyncClient()
    headers = {"Authorization": f"Bearer {key.secret}"}
    if method == "POST":
        response = await client.post(path, data=CHAT, content_type="application/json", headers=headers)
    else:
        response = await client.get(path, headers=headers)
    return response.status_code, {k.lower(): v for k, v in response.items()}, orjson.loads(response.content)


DOORS = [pytest.param(_lean, id="lean"), pytest.param(_django, id="django")]


def _assert_unavailable(status: int, headers: dict[str, str], body: Any) -> None:
    assert status == 503, body
    assert headers["content-type"].startswith("application/json")
    assert headers["retry-after"] == "5"
    assert headers.get("x-request-id")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "service_unavailable"


@pytest.mark.parametrize("door", DOORS)
async def test_key_and_catalog_in_memory_keep_being_served_and_an_uncached_key_is_503(door, demo, tmp_path, usage):
    cached, uncached = demo
    assert (await door(cached))[0] == 200  # the key and the catalog are now in this process's memory
    async with database_unreachable(tmp_path):
        status, _headers, body = await door(cached)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == "echo: hi"
        _assert_unavailable(*await door(uncached))
        models = await door(cached, "/v1/models", "GET")
        assert models[0] == 200
    # Back up: the uncached key is served again, from the database.
    assert (await door(uncached))[0] == 200
    records = await sync_to_async(usage.flushed)()
    assert [(r.status, r.error_code) for r in records].count((503, "service_unavailable")) == 1


@pytest.mark.parametrize("door", DOORS)
async def test_key_only_in_the_shared_cache_is_served(door, demo, tmp_path):
    cached, _ = demo
    assert (await door(cached))[0] == 200  # the key is now in the shared cache (Redis, or the test's LocMem) too
    local_caches_clear()  # as in a fresh worker process: nothing in memory...
    await sync_to_async(catalog_get)()  # ...but the catalog, loaded while the database is up
    async with database_unreachable(tmp_path):
        status, _headers, body = await door(cached)
    assert status == 200, body


@pytest.mark.parametrize("door", DOORS)
async def test_catalog_not_in_memory_is_503_while_the_database_is_down(door, demo, tmp_path):
    cached, _ = demo
    assert (await door(cached))[0] == 200
    catalog_invalidate()
    async with database_unreachable(tmp_path):
        _assert_unavailable(*await door(cached))
        _assert_unavailable(*await door(cached, "/v1/models", "GET"))
    assert (await door(cached))[0] == 200
