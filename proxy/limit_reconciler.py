"""The budget reconciliation in the embedded default: with no broker there is no ``celery beat``, so the serving
process runs ``proxy.limit_reconcile.limits_reconcile`` itself: once at start-up, before it serves (a restarted
embedded server's in-process counters start empty: this puts back what the ledger says was spent), then every
``RATE_LIMIT_RECONCILE_S`` (started and stopped by the lifespan, like ``proxy.lease_sweeper``).
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


def _reconcile() -> None:
    from proxy.limit_reconcile import limits_reconcile

    try:
        limits_reconcile()
    finally:
        close_old_connections()


async def _once() -> None:
    try:
        # A thread of its own (not the loop's): the ORM is sync, and the limiter calls run on a loop there.
        await sync_to_async(_reconcile, thread_sensitive=False)()
    except DATABASE_ERRORS:
        logger.warning("budget counters reconcile skipped: the database is unreachable")
    except Exception:
        logger.exception("budget counters reconcile failed")


async def _run(interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await _once()


async def limit_reconciler_start() -> None:
    """When tasks run in-process (no broker: nothing else would run it): reconcile now, then periodically."""
    global _task
    if settings.CELERY_TASK_ALWAYS_EAGER and _task is None:
        await _once()
        _task = asyncio.create_task(_run(settings.RATE_LIMIT_RECONCILE_S), name="limits-reconciler")


async def limit_reconciler_stop() -> None:
    global _task
    task, _task = _task, None
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
