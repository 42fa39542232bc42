"""Celery tasks of the proxy app: the lease sweep of the route registry (beat: ``ROUTE_LEASE_SWEEP_S``)."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="proxy.route_leases_expire", ignore_result=True, soft_time_limit=30, time_limit=60)
def route_leases_expire() -> list[str]:
    """Deactivate the routes whose lease ran out; the names (idempotent: two beats at once do no harm).

    A route stops serving at its lease's end whatever this task does (the gateway compares the lease per
    request); the sweep makes it show as inactive, with ``deactivated_reason="lease_expired"``.
    """
    from proxy.route_services import route_leases_expire as expire

    return expire()
