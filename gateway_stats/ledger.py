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

from django.db import connection, transaction

from gateway_stats.histogram import bucket_of
from gateway_stats.models import UsageRecord
from gateway_stats.usage import UsageEvent, usage_cost

Row = dict[str, Any]

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


# The ledger's columns in insert order, with their PostgreSQL array types (for the unnest() insert).
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "varchar"),
    ("request_id", "varchar"),
    ("started_at", "timestamptz"),
    ("ingested_at", "timestamptz"),
    ("key_id", "bigint"),
    ("key_prefix", "varchar"),
    ("user_id", "bigint"),
    ("model", "varchar"),
    ("upstream", "varchar"),
    ("upstream_model", "varchar"),
    ("route", "varchar"),
    ("endpoint", "varchar"),
    ("method", "varchar"),
    ("status", "smallint"),
    ("error_code", "varchar"),
    ("stream", "boolean"),
    ("prompt_tokens", "integer"),
    ("completion_tokens", "integer"),
    ("total_tokens", "integer"),
    ("input_price_per_1k", "numeric"),
    ("output_price_per_1k", "numeric"),
    ("cost", "numeric"),
    ("latency_ms", "float8"),
    ("latency_bucket", "smallint"),
    ("ttfb_ms", "float8"),
    ("request_bytes", "bigint"),
    ("response_bytes", "bigint"),
    ("client_ip", "inet"),
)
_COST_PLACES = Decimal(1).scaleb(-UsageRecord._meta.get_field("cost").decimal_places)
_SQLITE_CHUNK = 900  # ids per IN (...) under SQLite's variable limit


def _values(row: Row, ingested_at: datetime) -> tuple[Any, ...]:
    """One row's column values, in ``_COLUMNS`` order (the cost computed here, from the prices that rode along)."""
    prompt = max(0, int(row.get("prompt_tokens") or 0))
    completion = max(0, int(row.get("completion_tokens") or 0))
    input_price = Decimal(row.get("input_price_per_1k") or 0)
    output_price = Decimal(row.get("output_price_per_1k") or 0)
    latency = float(row.get("latency_ms") or 0)
    cost = usage_cost(prompt, completion, input_price, output_price).quantize(_COST_PLACES)
    return (
        row["event_id"],
        (row.get("request_id") or row["event_id"])[:128],
        datetime.fromtimestamp(float(row["started_at"]), tz=UTC),
        ingested_at,
        row.get("key_id"),
        (row.get("key_prefix") or "")[:32],
        row.get("user_id"),
        (row.get("model") or "")[:128],
        (row.get("upstream") or "")[:128],
        (row.get("upstream_model") or "")[:200],
        (row.get("route") or "")[:128],
        (row.get("endpoint") or "")[:200],
        (row.get("method") or "POST")[:10],
        int(row.get("status") or 0),
        (row.get("error_code") or "")[:64],
        bool(row.get("stream")),
        prompt,
        completion,
        prompt + completion,
        input_price,
        output_price,
        cost,
        latency,
        bucket_of(latency),
        row.get("ttfb_ms"),
        max(0, int(row.get("request_bytes") or 0)),
        max(0, int(row.get("response_bytes") or 0)),
        row.get("client_ip") or None,
    )


def ledger_write(rows: Sequence[Row]) -> list[str]:
    """Insert the rows not in the ledger yet, in one transaction; returns the ``event_id`` of those inserted.

    Duplicates (by ``event_id``, within the batch or against the ledger) are skipped, so writing the same
    batch any number of times leaves exactly one row per call; ``ON CONFLICT DO NOTHING`` also covers two
    consumers inserting the same redelivered row at the same moment. One statement on PostgreSQL (column
    arrays through ``unnest``); on SQLite, which has no arrays, a lookup of the ids present and an executemany.
    The ORM's bulk_create cost about 150 µs a row here (model instances, per-field preparation); this is a
    few µs.
    """
    unique: dict[str, Row] = {}
    for row in rows:
        unique.setdefault(row["event_id"], row)
    if not unique:
        return []
    now = datetime.now(tz=UTC)
    values = [_values(row, now) for row in unique.values()]
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    names = ", ".join(connection.ops.quote_name(name) for name, _type in _COLUMNS)
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            return _postgresql_insert(cursor, table, names, values)
        ids = list(unique)
        existing: set[str] = set()
        for start in range(0, len(ids), _SQLITE_CHUNK):
            chunk = ids[start : start + _SQLITE_CHUNK]
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(f'SELECT "event_id" FROM {table} WHERE "event_id" IN ({marks})', chunk)  # noqa: S608
            existing.update(found for (found,) in cursor.fetchall())
        fresh = [_sqlite_values(value) for value in values if value[0] not in existing]
        marks = ", ".join(["%s"] * len(_COLUMNS))
        cursor.executemany(
            f'INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT ("event_id") DO NOTHING',  # noqa: S608
            fresh,
        )
        return [value[0] for value in fresh]


def _postgresql_insert(cursor: Any, table: str, names: str, values: list[tuple[Any, ...]]) -> list[str]:
    """One ``INSERT ... SELECT FROM unnest(column arrays)``, its parameters bound by the server in binary
    (``%b``): Django's psycopg cursors bind on the client, which quotes every array element in Python."""
    import psycopg

    arrays = ", ".join(f"%b::{kind}[]" for _name, kind in _COLUMNS)
    query = (
        f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})"  # noqa: S608 (names are ours)
        ' ON CONFLICT ("event_id") DO NOTHING RETURNING "event_id"'
    )
    raw = cursor.cursor.connection  # the psycopg connection under Django's wrapper, in its transaction
    with psycopg.Cursor(raw) as server_bound:
        server_bound.execute(query, [list(column) for column in zip(*values, strict=True)])
        return [found for (found,) in server_bound.fetchall()]


def _sqlite_values(value: tuple[Any, ...]) -> tuple[Any, ...]:
    """Datetimes and decimals as Django stores them in SQLite (text)."""
    ops = connection.ops
    converted = list(value)
    for index in (2, 3):
        converted[index] = ops.adapt_datetimefield_value(converted[index])
    for index in (19, 20, 21):
        converted[index] = str(converted[index])
    return tuple(converted)


def rows_of(events: Iterable[UsageEvent]) -> list[Row]:
    return [usage_row(event) for event in events]
