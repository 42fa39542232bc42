"""Usage rollups: the ledger summed per minute, hour and day, and the retention of raw rows and rollups.

Every rollup bucket is recomputed whole, never incremented: minutes from the ledger's raw rows, hours
from their minutes, days from their hours (histograms merged by adding counts). Replacing a bucket is a
delete and an insert in one transaction, so running a rollup twice gives the same numbers. The same
transaction replaces the range's latency totals (``UsageLatencyRollup``: per bucket, the histograms of all
its rows added up, whatever the key, user, model, upstream or route), which unfiltered statistics read.

**The watermark.** ``UsageRollupState.watermark`` is an ``ingested_at`` instant: every rollup bucket
counts exactly the ledger rows of its time range whose ``ingested_at`` is before the watermark. A run
takes ``now`` as the new watermark, finds the minutes of the rows ingested since the previous watermark
(less ``USAGE_ROLLUP_OVERLAP_S``, for rows whose transaction committed late), recomputes those minutes
counting rows ingested before the new watermark, then the hours and days that contain them, and moves
the watermark, all in one transaction. A late row (started long before it reached the ledger) is
ingested after the watermark, so the next run recomputes its minute, hour and day. The statistics
(``gateway_stats.stats``) add the rows ingested from the watermark on to the rollups: a call counts once,
in a rollup or in that tail, as soon as it is in the ledger.

**Frozen buckets.** Buckets older than the first day kept of raw rows (``USAGE_RAW_RETENTION_DAYS``) are
never recomputed: their raw rows are being (or have been) deleted, and a recomputation would lose them.

**Locking.** One run at a time, cluster-wide: ``cache.add`` of a lock key is atomic on Redis, so a second
beat (or a range re-run) finds it taken and skips (the range re-run's task retries later).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Count, Max, Min, Q, QuerySet, Sum
from django.db.models.functions import TruncMinute
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from gateway_stats.histogram import histogram_merge
from gateway_stats.models import UsageLatencyRollup, UsageRecord, UsageRollup, UsageRollupState

__all__ = [
    "RetentionResult",
    "RollupResult",
    "bucket_ceil",
    "bucket_floor",
    "rollup_lock",
    "rollup_task",
    "retention_task",
    "usage_retention",
    "usage_rollup",
    "usage_rollup_range",
    "usage_watermark",
]

logger = logging.getLogger(__name__)

MINUTE = UsageRollup.Granularity.MINUTE
HOUR = UsageRollup.Granularity.HOUR
DAY = UsageRollup.Granularity.DAY
STEPS: dict[str, timedelta] = {MINUTE: timedelta(minutes=1), HOUR: timedelta(hours=1), DAY: timedelta(days=1)}
DIMENSIONS = ("key_id", "user_id", "model", "upstream", "route")
STATE_NAME = "ledger"
LOCK_KEY = "gateway_stats:rollup-lock"
# A run reads at most this much ingestion time (a backlog is caught up over several runs, each bounded).
MAX_WINDOW = timedelta(hours=6)
RETENTION_BATCH = 5000
_INSERT_BATCH = 1000
# Minutes recomputed from raw rows per query (and hours from minutes, per day) when re-running a range.
_RAW_CHUNK = timedelta(hours=1)
_MERGE_CHUNK = timedelta(days=1)
# The rollup task's limits (a range re-run may take minutes); the lock outlives a run killed at the hard
# limit by a minute, so two runs never overlap, and a dead worker's lock is gone 11 minutes later at most.
ROLLUP_SOFT_LIMIT_S = 540
ROLLUP_HARD_LIMIT_S = 600
LOCK_TIMEOUT_S = ROLLUP_HARD_LIMIT_S + 60
RETENTION_SOFT_LIMIT_S = 300
RETENTION_HARD_LIMIT_S = 330
# Retention stops deleting after this long and finishes at its next run (well within its soft time limit).
RETENTION_BUDGET_S = 240.0

Range = tuple[datetime, datetime]
_Dims = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class RollupResult:
    ran: bool
    watermark: datetime | None = None
    minutes: int = 0
    hours: int = 0
    days: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RetentionResult:
    raw_deleted: int
    minute_rollups_deleted: int
    rollups_deleted: int
    complete: bool
    # Rows of UsageLatencyRollup (minutes, hours and days), deleted with the rollups they total.
    latency_totals_deleted: int = 0


# --- buckets ---------------------------------------------------------------------------------------------


def bucket_floor(moment: datetime, granularity: str) -> datetime:
    """The start (UTC) of the ``granularity`` bucket holding ``moment``."""
    moment = moment.astimezone(UTC).replace(second=0, microsecond=0)
    if granularity == MINUTE:
        return moment
    moment = moment.replace(minute=0)
    if granularity == HOUR:
        return moment
    return moment.replace(hour=0)


def bucket_ceil(moment: datetime, granularity: str) -> datetime:
    """The first bucket start at or after ``moment``."""
    floor = bucket_floor(moment, granularity)
    return floor if floor == moment else floor + STEPS[granularity]


def _ranges_merge(ranges: Iterable[Range]) -> list[Range]:
    merged: list[Range] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _widen(ranges: Iterable[Range], granularity: str) -> list[Range]:
    """The ``granularity`` buckets containing ``ranges``, as merged ranges."""
    return _ranges_merge((bucket_floor(start, granularity), bucket_ceil(end, granularity)) for start, end in ranges)


def _chunks(ranges: Iterable[Range], size: timedelta) -> Iterator[Range]:
    for start, end in ranges:
        while start < end:
            yield start, min(end, start + size)
            start += size


def _frozen_before(now: datetime) -> datetime:
    """Buckets before this are never recomputed (the oldest day of raw rows may be under deletion)."""
    days: int = settings.USAGE_RAW_RETENTION_DAYS
    return bucket_floor(now - timedelta(days=days), DAY) + timedelta(days=1)


def _clip(ranges: Iterable[Range], lower: datetime) -> list[Range]:
    return [(max(start, lower), end) for start, end in ranges if end > lower]


# --- the lock --------------------------------------------------------------------------------------------


@contextmanager
def rollup_lock(timeout_s: float) -> Iterator[bool]:
    """Hold the rollup lock for the block (yields ``False``, holding nothing, when someone else has it).

    It expires after ``timeout_s`` so a worker killed mid-run blocks the next runs for that long at most.
    """
    token = uuid.uuid4().hex
    acquired = bool(cache.add(LOCK_KEY, token, timeout=int(timeout_s) + 1))
    try:
        yield acquired
    finally:
        # Released only if still ours: after an expiry, the key may be another run's.
        if acquired and cache.get(LOCK_KEY) == token:
            cache.delete(LOCK_KEY)


# --- computing buckets -----------------------------------------------------------------------------------


def _blank(granularity: str, bucket: datetime, dims: _Dims) -> UsageRollup:
    key_id, user_id, model, upstream, route = dims
    return UsageRollup(
        granularity=granularity,
        bucket=bucket,
        key_id=key_id,
        user_id=user_id,
        model=model,
        upstream=upstream,
        route=route,
        cost=Decimal(0),
        latency={},
    )


def _minutes_from_raw(start: datetime, end: datetime, watermark: datetime) -> list[UsageRollup]:
    """The minute rollups of ``[start, end)`` from the raw rows ingested before ``watermark``."""
    raw = UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end, ingested_at__lt=watermark).order_by()
    minute = TruncMinute("started_at", tzinfo=UTC)
    rows: dict[tuple[datetime, _Dims], UsageRollup] = {}
    sums = (
        raw.annotate(b=minute)
        .values("b", *DIMENSIONS)
        .annotate(
            n=Count("id"),
            n4=Count("id", filter=Q(status__gte=400, status__lt=500)),
            n5=Count("id", filter=Q(status__gte=500)),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            spent=Sum("cost"),
            sent=Sum("request_bytes"),
            received=Sum("response_bytes"),
            prefix=Max("key_prefix"),
        )
    )
    for item in sums:
        dims = tuple(item[name] for name in DIMENSIONS)
        row = _blank(MINUTE, item["b"], dims)
        row.key_prefix = item["prefix"] or ""
        row.requests = item["n"]
        row.errors_4xx = item["n4"]
        row.errors_5xx = item["n5"]
        row.prompt_tokens = item["prompt"] or 0
        row.completion_tokens = item["completion"] or 0
        row.cost = item["spent"] or Decimal(0)
        row.request_bytes = item["sent"] or 0
        row.response_bytes = item["received"] or 0
        rows[(item["b"], dims)] = row
    buckets = raw.annotate(b=minute).values_list("b", *DIMENSIONS, "latency_bucket").annotate(n=Count("id"))
    for values in buckets:
        bucket, dims, index, count = values[0], tuple(values[1:6]), values[6], values[7]
        rows[(bucket, dims)].latency[str(index)] = count
    return list(rows.values())


def _merged_from(source: str, target: str, start: datetime, end: datetime) -> list[UsageRollup]:
    """The ``target`` rollups of ``[start, end)`` as sums of its ``source`` rollups (histograms added)."""
    rows: dict[tuple[datetime, _Dims], UsageRollup] = {}
    histograms: dict[tuple[datetime, _Dims], list[dict[str, int]]] = {}
    parts = UsageRollup.objects.filter(granularity=source, bucket__gte=start, bucket__lt=end).order_by()
    for part in parts.iterator(chunk_size=2000):
        dims = (part.key_id, part.user_id, part.model, part.upstream, part.route)
        key = (bucket_floor(part.bucket, target), dims)
        row = rows.get(key)
        if row is None:
            row = rows[key] = _blank(target, key[0], dims)
            histograms[key] = []
        row.key_prefix = max(row.key_prefix, part.key_prefix)
        for name in UsageRollup.COUNTERS:
            setattr(row, name, getattr(row, name) + getattr(part, name))
        histograms[key].append(part.latency)
    for key, row in rows.items():
        row.latency = {str(index): count for index, count in sorted(histogram_merge(histograms[key]).items())}
    return list(rows.values())


def _latency_totals(granularity: str, rows: Sequence[UsageRollup]) -> list[UsageLatencyRollup]:
    """One ``UsageLatencyRollup`` per bucket of ``rows``: their histograms added up, whatever the dimensions."""
    histograms: dict[datetime, list[dict[str, int]]] = {}
    for row in rows:
        histograms.setdefault(row.bucket, []).append(row.latency)
    return [
        UsageLatencyRollup(
            granularity=granularity,
            bucket=bucket,
            latency={str(index): count for index, count in sorted(histogram_merge(parts).items())},
        )
        for bucket, parts in sorted(histograms.items())
    ]


def _replace(granularity: str, start: datetime, end: datetime, rows: Sequence[UsageRollup]) -> None:
    """Replace the ``granularity`` rollups of ``[start, end)`` by ``rows``, and the range's latency totals
    by theirs (callers hold a transaction: both change together)."""
    UsageRollup.objects.filter(granularity=granularity, bucket__gte=start, bucket__lt=end).delete()
    UsageRollup.objects.bulk_create(rows, batch_size=_INSERT_BATCH)
    UsageLatencyRollup.objects.filter(granularity=granularity, bucket__gte=start, bucket__lt=end).delete()
    UsageLatencyRollup.objects.bulk_create(_latency_totals(granularity, rows), batch_size=_INSERT_BATCH)


def _rebuild(minutes: Sequence[Range], watermark: datetime) -> tuple[int, int, int]:
    """Recompute the minute ranges from raw rows, then the hours and days containing them.

    Returns how many minutes, hours and days were recomputed. Callers clip the ranges to unfrozen buckets.
    """
    counts = [0, 0, 0]
    for start, end in _chunks(minutes, _RAW_CHUNK):
        with transaction.atomic():
            _replace(MINUTE, start, end, _minutes_from_raw(start, end, watermark))
        counts[0] += (end - start) // STEPS[MINUTE]
    hours = _widen(minutes, HOUR)
    for start, end in _chunks(hours, _MERGE_CHUNK):
        with transaction.atomic():
            _replace(HOUR, start, end, _merged_from(MINUTE, HOUR, start, end))
        counts[1] += (end - start) // STEPS[HOUR]
    for start, end in _chunks(_widen(hours, DAY), _MERGE_CHUNK):
        with transaction.atomic():
            _replace(DAY, start, end, _merged_from(HOUR, DAY, start, end))
        counts[2] += 1
    return counts[0], counts[1], counts[2]


def _touched_minutes(since: datetime | None, until: datetime) -> list[Range]:
    """The minutes (as merged ranges) holding the rows ingested in ``[since, until)``."""
    ingested = UsageRecord.objects.filter(ingested_at__lt=until).order_by()
    if since is not None:
        ingested = ingested.filter(ingested_at__gte=since)
    starts = ingested.annotate(b=TruncMinute("started_at", tzinfo=UTC)).values_list("b", flat=True).distinct()
    return _ranges_merge((start, start + STEPS[MINUTE]) for start in starts)


# --- services --------------------------------------------------------------------------------------------


def usage_watermark() -> datetime | None:
    """The rollups' watermark (``None`` before the first run: then no rollup exists and the ledger is all)."""
    return UsageRollupState.objects.filter(name=STATE_NAME).values_list("watermark", flat=True).first()


def usage_rollup(*, now: datetime | None = None) -> RollupResult:
    """One beat run: roll up what the ledger received since the last run (see the module docstring)."""
    now = now or timezone.now()
    with rollup_lock(LOCK_TIMEOUT_S) as acquired:
        if not acquired:
            logger.info("usage rollup skipped: another run holds the lock")
            return RollupResult(ran=False, reason="locked")
        previous = usage_watermark()
        overlap = timedelta(seconds=float(settings.USAGE_ROLLUP_OVERLAP_S))
        if previous is None:
            first = UsageRecord.objects.aggregate(first=Min("ingested_at"))["first"]
            since, watermark = None, now if first is None else min(now, first + MAX_WINDOW)
        else:
            # Never backwards (a clock stepped back): the buckets would lose rows the tail no longer adds.
            since, watermark = previous - overlap, max(previous, min(now, previous + MAX_WINDOW))
        with transaction.atomic():
            minutes = _clip(_touched_minutes(since, watermark), _frozen_before(now))
            counts = _rebuild(minutes, watermark)
            UsageRollupState.objects.update_or_create(name=STATE_NAME, defaults={"watermark": watermark})
    logger.info("usage rollup to %s: %s minutes, %s hours, %s days", watermark.isoformat(), *counts)
    return RollupResult(True, watermark, *counts)


def usage_rollup_range(*, start: datetime, end: datetime, now: datetime | None = None) -> RollupResult:
    """Recompute every bucket of ``[start, end)`` from the raw rows (e.g. after fixing ledger rows by hand).

    Minutes are recomputed in whole (``start`` rounded down, ``end`` up), then the hours and days holding
    them. Buckets older than the raw rows' retention are left as they are (their raw rows are gone). The
    watermark does not move: the buckets count the rows ingested before it, as every other bucket does.
    Nothing happens before the first regular run (there is no rollup to correct yet).
    """
    now = now or timezone.now()
    with rollup_lock(LOCK_TIMEOUT_S) as acquired:
        if not acquired:
            return RollupResult(ran=False, reason="locked")
        watermark = usage_watermark()
        if watermark is None:
            return RollupResult(ran=False, reason="no rollup has run yet")
        minutes = _clip(_widen([(start, end)], MINUTE), _frozen_before(now)) if start < end else []
        counts = _rebuild(minutes, watermark)
    logger.info("usage rollup re-run for %s..%s: %s minutes, %s hours, %s days", start, end, *counts)
    return RollupResult(True, watermark, *counts)


def _delete_batches(queryset: QuerySet[Any], deadline: float) -> tuple[int, bool]:
    """Delete ``queryset``'s rows ``RETENTION_BATCH`` ids at a time; stops at ``deadline`` (monotonic)."""
    deleted = 0
    model = queryset.model
    while True:
        ids = list(queryset.order_by().values_list("pk", flat=True)[:RETENTION_BATCH])
        if ids:
            deleted += model.objects.filter(pk__in=ids).delete()[0]
        if len(ids) < RETENTION_BATCH:
            return deleted, True
        if time.monotonic() >= deadline:
            return deleted, False


def usage_retention(*, now: datetime | None = None, budget_s: float = RETENTION_BUDGET_S) -> RetentionResult:
    """Delete raw rows (and minute rollups) past ``USAGE_RAW_RETENTION_DAYS``, hour and day rollups past
    ``USAGE_ROLLUP_RETENTION_DAYS`` (whole UTC days are kept), and the latency totals of the same buckets, in
    batches; a run that runs out of time says so (``complete=False``) and the next one carries on."""
    now = now or timezone.now()
    deadline = time.monotonic() + budget_s
    raw_days: int = settings.USAGE_RAW_RETENTION_DAYS
    rollup_days: int = settings.USAGE_ROLLUP_RETENTION_DAYS
    raw_cutoff = bucket_floor(now - timedelta(days=raw_days), DAY)
    rollup_cutoff = bucket_floor(now - timedelta(days=max(rollup_days, raw_days)), DAY)
    raw, raw_done = _delete_batches(UsageRecord.objects.filter(started_at__lt=raw_cutoff), deadline)
    minutes, minutes_done = _delete_batches(
        UsageRollup.objects.filter(granularity=MINUTE, bucket__lt=raw_cutoff), deadline
    )
    longer, longer_done = _delete_batches(
        UsageRollup.objects.filter(granularity__in=[HOUR, DAY], bucket__lt=rollup_cutoff), deadline
    )
    old_totals = Q(granularity=MINUTE, bucket__lt=raw_cutoff) | Q(granularity__in=[HOUR, DAY], bucket__lt=rollup_cutoff)
    totals, totals_done = _delete_batches(UsageLatencyRollup.objects.filter(old_totals), deadline)
    done = raw_done and minutes_done and longer_done and totals_done
    result = RetentionResult(raw, minutes, longer, done, latency_totals_deleted=totals)
    logger.info("usage retention: %s", result)
    return result


# --- Celery tasks ----------------------------------------------------------------------------------------


def _moment(value: str, name: str) -> datetime:
    parsed = parse_datetime(value)
    if parsed is None:
        raise ValueError(f"{name} is not an ISO 8601 date-time: {value!r}")
    return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=UTC)


@shared_task(
    name="gateway_stats.rollup",
    bind=True,
    ignore_result=True,
    max_retries=20,
    soft_time_limit=ROLLUP_SOFT_LIMIT_S,
    time_limit=ROLLUP_HARD_LIMIT_S,
)
def rollup_task(self: Any, start: str | None = None, end: str | None = None) -> None:
    """The beat's rollup run; with ``start`` and ``end`` (ISO 8601), a re-run of that range (retried while
    another run holds the lock)."""
    if start is None and end is None:
        usage_rollup()
        return
    if start is None or end is None:
        raise ValueError("a range re-run needs both start and end")
    result = usage_rollup_range(start=_moment(start, "start"), end=_moment(end, "end"))
    if result.reason == "locked":
        raise self.retry(countdown=max(5.0, float(settings.USAGE_ROLLUP_INTERVAL_S)))


@shared_task(
    name="gateway_stats.retention",
    ignore_result=True,
    soft_time_limit=RETENTION_SOFT_LIMIT_S,
    time_limit=RETENTION_HARD_LIMIT_S,
)
def retention_task() -> None:
    """The beat's hourly retention run."""
    usage_retention()
