"""The lease sweep in the embedded default: with no broker there is no ``celery beat``, so the serving process
runs ``proxy.route_leases_expire`` itself every ``ROUTE_LEASE_SWEEP_S`` (started and stopped by the lifespan).

Routes stop serving at their lease's end either way (the gateway compares it per request); the sweep is what
makes them show as inactive (``deactivated_reason="lease_expired"``) in the admin and the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from apiforge.unavailable import DATABASE_ERRORS

logger = logging.getLogger(__name__)

_task: asyncio.Task[None] | None = None


def _sweep() -> list[str]:
    from proxy.route_services import route_leases_expire

    try:
        return route_leases_expire()
    finally:
        close_old_connections()


async def _run(interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await sync_to_async(_sweep, thread_sensitive=False)()
        except DATABASE_ERRORS:
            logger.warning("route lease sweep skipped: the database is unreachable")
        except Exception:
            logger.exception("route lease sweep failed")


async def lease_sweeper_start() -> None:
    """Start the in-process sweep when tasks run in-process (no broker: nothing else would run it)."""
    global _task
    if settings.CELERY_TASK_ALWAYS_EAGER and _task is None:
        _task = asyncio.create_task(_run(settings.ROUTE_LEASE_SWEEP_S), name="route-lease-sweeper")


async def lease_sweeper_stop() -> None:
    global _task
    task, _task = _task, None
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
