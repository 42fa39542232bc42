"""The ASGI lifespan runs every app's hooks, registered by the apps themselves, in INSTALLED_APPS order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from apiforge import lifespan as lifespan_module
from apiforge.lifespan import AppHooks, lifespan, lifespan_hooks_register


def test_the_apps_register_their_hooks_proxy_before_gateway_stats():
    names = [hooks.app for hooks in lifespan_module._app_hooks()]
    assert names.index("proxy") < names.index("gateway_stats")


async def _run(messages: list[str]) -> list[str]:
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for kind in messages:
        incoming.put_nowait({"type": kind})
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await asyncio.wait_for(lifespan({"type": "lifespan"}, incoming.get, send), timeout=10)
    return sent


@pytest.mark.expect_error_log
async def test_shutdown_runs_every_stop_hook_even_when_one_fails(monkeypatch, caplog):
    calls: list[str] = []

    async def start() -> None:
        calls.append("start")

    async def broken() -> None:
        calls.append("broken")
        raise RuntimeError("boom")

    async def fine() -> None:
        calls.append("fine")

    monkeypatch.setattr(lifespan_module, "_registered", [])
    lifespan_hooks_register(AppHooks("first", start=start, stop=broken))
    lifespan_hooks_register(AppHooks("second", stop=fine))
    lifespan_hooks_register(AppHooks("second", stop=fine))  # registering again replaces, not duplicates

    sent = await _run(["lifespan.startup", "lifespan.shutdown"])

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert calls == ["start", "broken", "fine"]
    assert any("error stopping first" in record.getMessage() for record in caplog.records)
