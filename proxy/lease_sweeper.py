"""The lease sweep in the embedded default: with no broker there is no ``celery beat``, so the serving process
runs ``proxy.route_leases_expire`` itself every ``ROUTE_LEASE_SWEEP_S`` (started and stopped by the lifespan).

Routes stop serving at their lease's end either way (the gateway compares it per request); the sweep is what
makes them show as inactive (``deactivated_reason="lease_expired"``) in the admin and the API.
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from proxy.in_process_jobs import job_every, job_stop

logger = logging.getLogger(__name__)

_task: asyncio.Task[None] | None = None


def _sweep() -> list[str]:
    from proxy.route_services import route_leases_expire

    return route_leases_expire()


async def lease_sweeper_start() -> None:
    """Start the in-process sweep when tasks run in-process (no broker: nothing else would run it)."""
    global _task
    if settings.CELERY_TASK_ALWAYS_EAGER and _task is None:
        every = job_every(settings.ROUTE_LEASE_SWEEP_S, _sweep, "route lease sweep", logger)
        _task = asyncio.create_task(every, name="route-lease-sweeper")


async def lease_sweeper_stop() -> None:
    global _task
    task, _task = _task, None
    await job_stop(task)
