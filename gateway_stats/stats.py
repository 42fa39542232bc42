"""Usage statistics selectors: time series, summary (totals and top keys, models, upstreams), errors.

**Rollups plus the tail.** Every rollup bucket counts the ledger rows of its range ingested before the
rollups' watermark (``gateway_stats.rollups``). A statistic over a range is therefore the rollups of that
range plus the raw rows of the range ingested from the watermark on (the tail): each call is counted
exactly once, from the moment it is in the ledger, whether or not a rollup has run since. Histograms of
both are merged by adding counts, so percentiles are those of the calls themselves. Both are read in one
snapshot on PostgreSQL (``REPEATABLE READ``), so a rollup committing in between cannot count a call twice.
Unfiltered histograms (everyone's calls, per bucket or in all) come from the rollups' latency totals
(``UsageLatencyRollup``, one row per bucket) rather than from the per-dimension rollup rows.

Ranges are whole buckets: a series' ``start`` is rounded down and its ``end`` up to its interval; a
summary's to the minute, then read as whole days, hours and minutes (the fewest rollup rows; minute
rollups are kept as long as raw rows, so summaries older than ``USAGE_RAW_RETENTION_DAYS`` are exact to
the hour). Days are UTC days.

Errors are read from raw rows (the failed calls of a range, a partial index) with their request ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, F, Max, Q, QuerySet, Sum, Window
from django.db.models.functions import RowNumber, Trunc

from gateway_stats.histogram import percentiles
from gateway_stats.models import UsageLatencyRollup, UsageRecord, UsageRollup
from gateway_stats.rollups import DAY, HOUR, MINUTE, bucket_ceil, bucket_floor, usage_watermark

INTERVALS = (MINUTE, HOUR, DAY)
# group_by value -> the column (the same name on rollups and raw rows).
GROUP_COLUMNS = {"key": "key_id", "user": "user_id", "model": "model", "upstream": "upstream", "route": "route"}
QUANTILES = (0.5, 0.95, 0.99)
TOP_BY = ("requests", "cost")

Piece = tuple[str, datetime, datetime]


@dataclass(slots=True)
class UsageNumbers:
    """What a set of calls did. ``latency`` is a histogram ``{bucket index: count}`` (empty where not kept)."""

    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = field(default_factory=Decimal)
    request_bytes: int = 0
    response_bytes: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    label: str = ""

    @property
    def errors(self) -> int:
        return self.errors_4xx + self.errors_5xx

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def latency_percentiles(self) -> list[float | None]:
        """p50, p95 and p99 in milliseconds (``None`` without calls)."""
        return percentiles(self.latency, QUANTILES)

    def add(self, other: UsageNumbers) -> None:
        for name in UsageRollup.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.label = max(self.label, other.label)
        self.histogram_add(other.latency.items())

    def histogram_add(self, counts: Iterable[tuple[Any, Any]]) -> None:
        for index, count in counts:
            self.latency[int(index)] = self.latency.get(int(index), 0) + int(count)


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Whose calls a statistic covers. ``scope_user_id`` is the caller's own id for non-staff (their keys'
    usage only, whatever else is asked), ``None`` for staff (everyone's)."""

    scope_user_id: int | None
    key_id: int | None = None
    user_id: int | None = None
    model: str | None = None

    def q(self) -> Q:
        q = Q()
        if self.scope_user_id is not None:
            q &= Q(user_id=self.scope_user_id)
        if self.user_id is not None:
            q &= Q(user_id=self.user_id)
        if self.key_id is not None:
            q &= Q(key_id=self.key_id)
        if self.model is not None:
            q &= Q(model=self.model)
        return q

    def is_everything(self) -> bool:
        """Whether the filter lets every call through (staff, no key, user or model asked)."""
        return not self.q()


@dataclass(frozen=True, slots=True)
class UsageSeries:
    group: str | None
    label: str | None
    points: list[tuple[datetime, UsageNumbers]]


@dataclass(frozen=True, slots=True)
class UsageTimeSeries:
    start: datetime
    end: datetime
    interval: str
    group_by: str | None
    series: list[UsageSeries]


@dataclass(frozen=True, slots=True)
class UsageGroupTotal:
    group: str | None
    label: str | None
    numbers: UsageNumbers


@dataclass(frozen=True, slots=True)
class UsageSummary:
    start: datetime
    end: datetime
    totals: UsageNumbers
    top_keys: list[UsageGroupTotal]
    top_models: list[UsageGroupTotal]
    top_upstreams: list[UsageGroupTotal]


@dataclass(frozen=True, slots=True)
class UsageErrorGroup:
    error_code: str
    status: int
    upstream: str
    model: str
    count: int
    last_at: datetime
    request_ids: list[str]


# --- reading rollups and the tail ------------------------------------------------------------------------


@contextmanager
def _snapshot() -> Iterator[None]:
    """The watermark, the rollups and the tail as of one instant (PostgreSQL; SQLite has no concurrent
    rollup writer in the embedded default, and its write lock is not worth taking for a read)."""
    if connection.vendor != "postgresql":
        yield
        return
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield


def _rollup_sums() -> dict[str, Any]:
    return {
        "n": Sum("requests"),
        "n4": Sum("errors_4xx"),
        "n5": Sum("errors_5xx"),
        "prompt": Sum("prompt_tokens"),
        "completion": Sum("completion_tokens"),
        "spent": Sum("cost"),
        "sent": Sum("request_bytes"),
        "received": Sum("response_bytes"),
        "prefix": Max("key_prefix"),
    }


def _raw_sums() -> dict[str, Any]:
    return {
        **_rollup_sums(),
        "n": Count("id"),
        "n4": Count("id", filter=Q(status__gte=400, status__lt=500)),
        "n5": Count("id", filter=Q(status__gte=500)),
    }


def _numbers(item: dict[str, Any]) -> UsageNumbers:
    return UsageNumbers(
        requests=item["n"] or 0,
        errors_4xx=item["n4"] or 0,
        errors_5xx=item["n5"] or 0,
        prompt_tokens=item["prompt"] or 0,
        completion_tokens=item["completion"] or 0,
        cost=item["spent"] or Decimal(0),
        request_bytes=item["sent"] or 0,
        response_bytes=item["received"] or 0,
        label=item["prefix"] or "",
    )


def _cover(start: datetime, end: datetime) -> list[Piece]:
    """``[start, end)`` (whole minutes) as the fewest rollup pieces: whole days, then hours, then minutes."""
    pieces: list[Piece] = []
    pending: list[tuple[datetime, datetime, int]] = [(start, end, 0)]
    while pending:
        low, high, level = pending.pop()
        if low >= high:
            continue
        granularity = (DAY, HOUR, MINUTE)[level]
        first, last = bucket_ceil(low, granularity), bucket_floor(high, granularity)
        if granularity == MINUTE or first < last:
            first, last = (low, high) if granularity == MINUTE else (first, last)
            pieces.append((granularity, first, last))
            if granularity != MINUTE:
                pending += [(low, first, level + 1), (last, high, level + 1)]
        else:
            pending.append((low, high, level + 1))
    return sorted(pieces, key=lambda piece: piece[1])


def _collect(
    *,
    start: datetime,
    end: datetime,
    pieces: list[Piece],
    flt: UsageFilter,
    keys: tuple[str, ...],
    histogram_keys: tuple[str, ...],
    interval: str | None = None,
) -> dict[tuple[Any, ...], UsageNumbers]:
    """Numbers per ``keys`` (rollup columns, and ``b`` the bucket when ``interval`` is given), with the
    latency histograms per ``histogram_keys`` in entries of their own (keyed ``("latency", *values)``)."""
    watermark = usage_watermark()
    pieces_q = Q()
    for granularity, low, high in pieces:
        pieces_q |= Q(granularity=granularity, bucket__gte=low, bucket__lt=high)
    rollups: QuerySet[Any] = UsageRollup.objects.none()
    rollup_histograms: QuerySet[Any] = rollups
    if watermark is not None and pieces:
        rollups = rollup_histograms = UsageRollup.objects.filter(pieces_q, flt.q()).order_by()
    tail: QuerySet[Any] = UsageRecord.objects.filter(flt.q(), started_at__gte=start, started_at__lt=end).order_by()
    if watermark is not None:
        tail = tail.filter(ingested_at__gte=watermark)
    rollup_keys, rollup_histogram_keys = keys, histogram_keys
    if interval is not None:
        # The rollups' own column (not an annotation: _rollup_histograms reads the columns in this order).
        rollup_keys = tuple("bucket" if name == "b" else name for name in keys)
        rollup_histogram_keys = tuple("bucket" if name == "b" else name for name in histogram_keys)
        tail = tail.annotate(b=Trunc("started_at", interval, tzinfo=UTC))
    if watermark is not None and pieces and flt.is_everything() and set(rollup_histogram_keys) <= {"bucket"}:
        # Every call's histogram per bucket or in all: the latency totals hold it, one row per bucket (the
        # same counts as the bucket's rollup rows added up, which are hundreds a day).
        rollup_histograms = UsageLatencyRollup.objects.filter(pieces_q).order_by()
    result: dict[tuple[Any, ...], UsageNumbers] = {}

    def entry(key: tuple[Any, ...]) -> UsageNumbers:
        numbers = result.get(key)
        if numbers is None:
            numbers = result[key] = UsageNumbers()
        return numbers

    for item in rollups.values(*rollup_keys).annotate(**_rollup_sums()):
        entry(tuple(item[name] for name in rollup_keys)).add(_numbers(item))
    for item in tail.values(*keys).annotate(**_raw_sums()):
        entry(tuple(item[name] for name in keys)).add(_numbers(item))
    for values in _rollup_histograms(rollup_histograms, rollup_histogram_keys):
        entry(("latency", *values[:-2])).histogram_add([(values[-2], values[-1])])
    for values in tail.values_list(*histogram_keys, "latency_bucket").annotate(count=Count("id")):
        entry(("latency", *values[:-2])).histogram_add([(values[-2], values[-1])])
    return result


def _rollup_histograms(rollups: QuerySet[Any], keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """``(*keys, bucket index, count)`` of the rollups' histograms added up per ``keys`` (model fields only).

    PostgreSQL adds them itself (``jsonb_each_text``): parsing each row's JSON in Python costs about 15 µs,
    seconds for a day of busy minute rows. Elsewhere (the embedded SQLite) they are added here.
    """
    if not rollups.query.is_empty() and connection.vendor == "postgresql":
        sql, params = rollups.values_list(*keys, "latency").query.sql_with_params()
        columns = [f"c{index}" for index in range(len(keys))]
        query = (
            f"SELECT {''.join(f'{column}, ' for column in columns)}h.key::integer, SUM(h.value::bigint)"  # noqa: S608
            f" FROM ({sql}) AS r({', '.join([*columns, 'latency'])})"
            " CROSS JOIN LATERAL jsonb_each_text(r.latency) AS h"
            f" GROUP BY {', '.join([*columns, 'h.key'])}"
        )
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            return [tuple(row) for row in cursor.fetchall()]
    totals: dict[tuple[Any, ...], int] = {}
    for values in rollups.values_list(*keys, "latency"):
        for index, count in values[-1].items():
            key = (*values[:-1], int(index))
            totals[key] = totals.get(key, 0) + int(count)
    return [(*key, count) for key, count in totals.items()]


def _group_value(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# --- selectors -------------------------------------------------------------------------------------------


def usage_time_series(
    *, start: datetime, end: datetime, interval: str, group_by: str | None, flt: UsageFilter
) -> UsageTimeSeries:
    """Numbers per ``interval`` bucket (only buckets with calls), one series per ``group_by`` value (a
    single one without), the busiest series first."""
    start, end = bucket_floor(start, interval), bucket_ceil(end, interval)
    column = GROUP_COLUMNS[group_by] if group_by else None
    keys = ("b", column) if column else ("b",)
    with _snapshot():
        collected = _collect(
            start=start,
            end=end,
            pieces=[(interval, start, end)],
            flt=flt,
            keys=keys,
            histogram_keys=keys,
            interval=interval,
        )
    groups: dict[Any, list[tuple[datetime, UsageNumbers]]] = {}
    labels: dict[Any, str] = {}
    for key, numbers in collected.items():
        if key[0] == "latency":
            continue
        numbers.latency = collected.get(("latency", *key), UsageNumbers()).latency
        group = key[1] if column else None
        groups.setdefault(group, []).append((key[0], numbers))
        labels[group] = max(labels.get(group, ""), numbers.label)
    series = [
        UsageSeries(
            group=_group_value(group),
            label=(labels[group] or None) if column == "key_id" else _group_value(group),
            points=sorted(points, key=lambda point: point[0]),
        )
        for group, points in groups.items()
    ]
    series.sort(key=lambda one: (-sum(numbers.requests for _, numbers in one.points), one.group or ""))
    return UsageTimeSeries(start=start, end=end, interval=interval, group_by=group_by, series=series)


def _top(
    rows: list[tuple[tuple[Any, ...], UsageNumbers]], position: int, top_by: str, top: int, labelled: bool
) -> list[UsageGroupTotal]:
    totals: dict[Any, UsageNumbers] = {}
    for key, numbers in rows:
        totals.setdefault(key[position], UsageNumbers()).add(numbers)
    for numbers in totals.values():
        numbers.latency = {}
    ranked = sorted(
        totals.items(),
        key=lambda item: (-(item[1].cost if top_by == "cost" else item[1].requests), str(item[0])),
    )
    return [
        UsageGroupTotal(
            group=_group_value(value),
            label=(numbers.label or None) if labelled else _group_value(value),
            numbers=numbers,
        )
        for value, numbers in ranked[:top]
    ]


def usage_summary(
    *, start: datetime, end: datetime, flt: UsageFilter, top_by: str = "requests", top: int = 10
) -> UsageSummary:
    """Totals over ``[start, end)`` (whole minutes) with latency percentiles, and the ``top`` keys, models and
    upstreams by ``requests`` or ``cost``."""
    start, end = bucket_floor(start, MINUTE), bucket_ceil(end, MINUTE)
    with _snapshot():
        collected = _collect(
            start=start,
            end=end,
            pieces=_cover(start, end),
            flt=flt,
            keys=("key_id", "model", "upstream"),
            histogram_keys=(),
        )
    totals = UsageNumbers()
    rows = [(key, numbers) for key, numbers in collected.items() if key[:1] != ("latency",)]
    for _, numbers in rows:
        totals.add(numbers)
    totals.label = ""
    totals.latency = collected.get(("latency",), UsageNumbers()).latency
    return UsageSummary(
        start=start,
        end=end,
        totals=totals,
        top_keys=_top(rows, 0, top_by, top, labelled=True),
        top_models=_top(rows, 1, top_by, top, labelled=False),
        top_upstreams=_top(rows, 2, top_by, top, labelled=False),
    )


def usage_errors(
    *, start: datetime, end: datetime, flt: UsageFilter, recent: int = 5, limit: int = 100
) -> list[UsageErrorGroup]:
    """Failed calls (status 400 and up) of ``[start, end)`` counted by error code, status, upstream and model,
    the most frequent first (at most ``limit`` groups), each with its ``recent`` latest request ids."""
    failed = UsageRecord.objects.filter(flt.q(), started_at__gte=start, started_at__lt=end, status__gte=400).order_by()
    dims = ("error_code", "status", "upstream", "model")
    groups = list(
        failed.values(*dims)
        .annotate(count=Count("id"), last_at=Max("started_at"))
        .order_by("-count", "-last_at", *dims)[:limit]
    )
    ranked = failed.annotate(
        rank=Window(
            RowNumber(), partition_by=[F(name) for name in dims], order_by=[F("started_at").desc(), F("id").desc()]
        )
    ).filter(rank__lte=recent)
    latest: dict[tuple[Any, ...], list[tuple[datetime, str]]] = {}
    for code, status, upstream, model, started_at, request_id in ranked.values_list(*dims, "started_at", "request_id"):
        latest.setdefault((code, status, upstream, model), []).append((started_at, request_id))
    result: list[UsageErrorGroup] = []
    for group in groups:
        key = tuple(group[name] for name in dims)
        ids = [request_id for _, request_id in sorted(latest.get(key, []), key=lambda pair: pair[0], reverse=True)]
        result.append(
            UsageErrorGroup(
                error_code=group["error_code"],
                status=group["status"],
                upstream=group["upstream"],
                model=group["model"],
                count=group["count"],
                last_at=group["last_at"],
                request_ids=ids,
            )
        )
    return result
