"""The usage ledger's write side: usage events as wire rows, and the idempotent bulk insert.

A wire row is a JSON-safe dict (what a Celery message or a spool line carries); ``ledger_write`` inserts a
batch of them in one transaction and ignores the rows whose ``event_id`` is already there, so a batch
delivered twice (a redelivery after a consumer died, a spool replayed after a crash) is written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import transaction

from gateway_stats.histogram import bucket_of
from gateway_stats.models import UsageRecord
from gateway_stats.usage import UsageEvent

Row = dict[str, Any]

_THOUSAND = Decimal(1000)
_INSERT_BATCH = 1000


def usage_row(event: UsageEvent) -> Row:
    """One event as a wire row (the cost is computed at the consumer, from the prices that ride along)."""
    return {
        "event_id": event.event_id,
        "request_id": event.request_id,
        "started_at": event.started_at,
        "key_id": event.key_id,
        "key_prefix": event.key_prefix,
        "user_id": event.user_id,
        "model": event.model,
        "upstream": event.upstream,
        "upstream_model": event.upstream_model,
        "route": event.route,
        "endpoint": event.endpoint,
        "method": event.method,
        "status": event.status,
        "error_code": event.error_code,
        "stream": event.stream,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "input_price_per_1k": str(event.input_price_per_1k),
        "output_price_per_1k": str(event.output_price_per_1k),
        "latency_ms": round(event.latency_ms, 3),
        "ttfb_ms": round(event.ttfb_ms, 3) if event.ttfb_ms else None,
        "request_bytes": event.request_bytes,
        "response_bytes": event.response_bytes,
        "client_ip": event.client_ip or None,
    }


def _record(row: Row) -> UsageRecord:
    prompt = max(0, int(row.get("prompt_tokens") or 0))
    completion = max(0, int(row.get("completion_tokens") or 0))
    input_price = Decimal(row.get("input_price_per_1k") or 0)
    output_price = Decimal(row.get("output_price_per_1k") or 0)
    latency = float(row.get("latency_ms") or 0)
    return UsageRecord(
        event_id=row["event_id"],
        request_id=row.get("request_id") or row["event_id"],
        started_at=datetime.fromtimestamp(float(row["started_at"]), tz=UTC),
        key_id=row.get("key_id"),
        key_prefix=row.get("key_prefix") or "",
        user_id=row.get("user_id"),
        model=row.get("model") or "",
        upstream=row.get("upstream") or "",
        upstream_model=row.get("upstream_model") or "",
        route=row.get("route") or "",
        endpoint=row.get("endpoint") or "",
        method=row.get("method") or "POST",
        status=int(row.get("status") or 0),
        error_code=row.get("error_code") or "",
        stream=bool(row.get("stream")),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        input_price_per_1k=input_price,
        output_price_per_1k=output_price,
        cost=(prompt * input_price + completion * output_price) / _THOUSAND,
        latency_ms=latency,
        latency_bucket=bucket_of(latency),
        ttfb_ms=row.get("ttfb_ms"),
        request_bytes=max(0, int(row.get("request_bytes") or 0)),
        response_bytes=max(0, int(row.get("response_bytes") or 0)),
        client_ip=row.get("client_ip") or None,
    )


def ledger_write(rows: Sequence[Row]) -> list[UsageRecord]:
    """Insert the rows not in the ledger yet, in one transaction; returns the records actually inserted.

    Duplicates (by ``event_id``, within the batch or against the ledger) are skipped, so writing the same
    batch any number of times leaves exactly one row per call. ``ignore_conflicts`` also covers two
    consumers inserting the same redelivered row at the same moment.
    """
    unique: dict[str, Row] = {}
    for row in rows:
        unique.setdefault(row["event_id"], row)
    if not unique:
        return []
    with transaction.atomic():
        existing = set(UsageRecord.objects.filter(event_id__in=list(unique)).values_list("event_id", flat=True))
        records = [_record(row) for event_id, row in unique.items() if event_id not in existing]
        UsageRecord.objects.bulk_create(records, batch_size=_INSERT_BATCH, ignore_conflicts=True)
    return records


def rows_of(events: Iterable[UsageEvent]) -> list[Row]:
    return [usage_row(event) for event in events]
