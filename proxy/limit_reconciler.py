"""The budget reconciliation in the embedded default: with no broker there is no ``celery beat``, so the serving
process runs ``proxy.limit_reconcile.limits_reconcile`` itself: once at start-up, before it serves (a restarted
embedded server's in-process counters start empty: this puts back what the ledger says was spent), then every
``RATE_LIMIT_RECONCILE_S`` (started and stopped by the lifespan, like ``proxy.lease_sweeper``).
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from proxy.in_process_jobs import job_every, job_run, job_stop

logger = logging.getLogger(__name__)

_task: asyncio.Task[None] | None = None
_WHAT = "budget counters reconcile"


def _reconcile() -> None:
    from proxy.limit_reconcile import limits_reconcile

    # A thread of its own (not the loop's): the ORM is sync, and the limiter calls run on a loop there.
    limits_reconcile()


async def limit_reconciler_start() -> None:
    """When tasks run in-process (no broker: nothing else would run it): reconcile now, then periodically."""
    global _task
    if settings.CELERY_TASK_ALWAYS_EAGER and _task is None:
        await job_run(_reconcile, _WHAT, logger)
        every = job_every(settings.RATE_LIMIT_RECONCILE_S, _reconcile, _WHAT, logger)
        _task = asyncio.create_task(every, name="limits-reconciler")


async def limit_reconciler_stop() -> None:
    global _task
    task, _task = _task, None
    await job_stop(task)
