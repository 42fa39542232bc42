"""Periodic jobs the serving process runs itself in the embedded default (no broker, so no ``celery beat``):
the route lease sweep (``proxy.lease_sweeper``) and the budget reconciliation (``proxy.limit_reconciler``).

Each run is a sync job in a thread of its own (the ORM is sync), its database connection closed after it; a
database outage is one WARNING, anything else an ERROR with its traceback; the loop goes on either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from apiforge.unavailable import DATABASE_ERRORS


def _closing(job: Callable[[], object]) -> None:
    try:
        job()
    finally:
        close_old_connections()


async def job_run(job: Callable[[], object], what: str, logger: logging.Logger) -> None:
    """Run ``job`` once off the event loop; its failures are logged (``what`` names it), never raised."""
    try:
        await sync_to_async(_closing, thread_sensitive=False)(job)
    except DATABASE_ERRORS:
        logger.warning("%s skipped: the database is unreachable", what)
    except Exception:
        logger.exception("%s failed", what)


async def job_every(interval: float, job: Callable[[], object], what: str, logger: logging.Logger) -> None:
    """Run ``job`` every ``interval`` seconds, for ever (until cancelled)."""
    while True:
        await asyncio.sleep(interval)
        await job_run(job, what, logger)


async def job_stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a ``job_every`` task and wait for it to end."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
