"""Celery tasks of the proxy app: the lease sweep of the route registry (beat: ``ROUTE_LEASE_SWEEP_S``) and the
budget counters' reconciliation with the ledger (beat: ``RATE_LIMIT_RECONCILE_S``)."""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="proxy.route_leases_expire", ignore_result=True, soft_time_limit=30, time_limit=60)
def route_leases_expire() -> list[str]:
    """Deactivate the routes whose lease ran out; the names (idempotent: two beats at once do no harm).

    A route stops serving at its lease's end whatever this task does (the gateway compares the lease per
    request); the sweep makes it show as inactive, with ``deactivated_reason="lease_expired"``.
    """
    from proxy.route_services import route_leases_expire as expire

    return expire()


@shared_task(name="proxy.limits_reconcile", ignore_result=True, soft_time_limit=50, time_limit=60)
def limits_reconcile() -> dict[str, Any]:
    """Rebuild the limiter's budget counters from the ledger: missing or low ones raised to the ledger's sums,
    higher ones reported (idempotent: two beats at once do no harm). What it did, as JSON."""
    from proxy.limit_reconcile import limits_reconcile as reconcile

    return reconcile().as_dict()
