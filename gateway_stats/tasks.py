"""Celery tasks of the statistics app: the ledger's consumer (``usage_ingest``)."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from apiforge.unavailable import DATABASE_ERRORS
from gateway_stats.ledger import Row, ledger_write
from gateway_stats.transport import ingestion_lag_note

INGEST_RETRY_S = 5


# acks_late: the message is acknowledged after the task returned, i.e. after the insert committed; a worker
# killed before that leaves it unacknowledged and the broker delivers it again (reject_on_worker_lost covers a
# prefork child that died). The insert ignores rows already written, so redelivery never doubles a row.
@shared_task(
    bind=True,
    name="gateway_stats.usage_ingest",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=None,
    serializer="orjson",
)
def usage_ingest(self: Task[Any, Any], rows: list[Row]) -> int:
    """Write a batch of usage rows to the ledger (idempotent); returns how many were new."""
    try:
        written = ledger_write(rows)
    except DATABASE_ERRORS as exc:
        # The database is away: the same rows again later (a new message; this one is then acknowledged).
        raise self.retry(exc=exc, countdown=INGEST_RETRY_S) from exc
    ingestion_lag_note(rows)
    return len(written)
