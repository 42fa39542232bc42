"""The latency totals (``UsageLatencyRollup``): per bucket, every rollup row's histogram added up; kept in step
with the rollups by every run, range re-run and retention; filled by their migration; and read by the
unfiltered statistics, whose percentiles stay those of the raw calls."""

from __future__ import annotations

import importlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from django.apps import apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from gateway_stats.histogram import percentiles
from gateway_stats.models import UsageLatencyRollup, UsageRecord, UsageRollup, UsageRollupState
from gateway_stats.rollups import DAY, HOUR, MINUTE, bucket_floor, usage_retention, usage_rollup, usage_rollup_range
from gateway_stats.stats import QUANTILES, UsageFilter, usage_summary, usage_time_series
from tests.stats.conftest import call, hour_ago, random_calls

pytestmark = pytest.mark.django_db

EVERYONE = UsageFilter(scope_user_id=None)
Histograms = dict[tuple[str, datetime], Counter[int]]


def _counter(latency: dict[str, int]) -> Counter[int]:
    return Counter({int(index): int(count) for index, count in latency.items()})


def totals() -> Histograms:
    result: Histograms = {}
    for row in UsageLatencyRollup.objects.all():
        key = (row.granularity, row.bucket)
        assert key not in result, f"two latency totals for {key}"
        result[key] = _counter(row.latency)
    return result


def merged_rollups() -> Histograms:
    """The rollup rows' histograms added up per bucket, as the per-dimension statistics read them."""
    result: Histograms = {}
    for row in UsageRollup.objects.all():
        result.setdefault((row.granularity, row.bucket), Counter()).update(_counter(row.latency))
    return result


def from_raw(granularities: tuple[str, ...] = (MINUTE, HOUR, DAY)) -> Histograms:
    result: Histograms = {}
    for row in UsageRecord.objects.all():
        for granularity in granularities:
            result.setdefault((granularity, bucket_floor(row.started_at, granularity)), Counter())[
                row.latency_bucket
            ] += 1
    return result


def test_a_rollup_run_writes_one_total_per_bucket_equal_to_its_rows_added_up() -> None:
    random_calls(250, start=hour_ago(30), span=timedelta(hours=29, minutes=30))

    usage_rollup()

    assert totals() == merged_rollups() == from_raw()
    assert {granularity for granularity, _ in totals()} == {MINUTE, HOUR, DAY}


def test_a_range_rerun_replaces_the_totals_of_its_range() -> None:
    records = random_calls(80, start=hour_ago(4), span=timedelta(hours=3))
    usage_rollup()
    lonely = call(started_at=hour_ago(3.5) + timedelta(seconds=30), latency_ms=9000.0)
    usage_rollup()
    UsageRecord.objects.filter(pk=records[0].pk).update(latency_ms=0.05, latency_bucket=0)
    UsageRecord.objects.filter(pk__in=[records[1].pk, lonely.pk]).delete()
    assert totals() != from_raw()

    result = usage_rollup_range(start=hour_ago(5), end=hour_ago(0))

    assert result.ran
    assert totals() == merged_rollups() == from_raw()
    # A minute whose every call was deleted has no rollup left, so no total either (unless others share it).
    minute = (MINUTE, bucket_floor(lonely.started_at, MINUTE))
    assert (minute in totals()) == UsageRollup.objects.filter(granularity=MINUTE, bucket=minute[1]).exists()
    usage_rollup()
    assert totals() == from_raw()  # running again changes nothing


def test_retention_deletes_the_totals_with_the_rollups_they_total() -> None:
    now = datetime.now(UTC)
    for days in (27, 24, 3):
        random_calls(15, start=now - timedelta(days=days), span=timedelta(hours=2), seed=days)
    usage_rollup()
    assert totals() == merged_rollups() == from_raw()

    # Ten days on: the 27- and 24-day-old raw rows and minute rollups are past the 30 days of raw retention.
    first = usage_retention(now=now + timedelta(days=10))

    assert first.complete
    assert first.minute_rollups_deleted > 0
    assert 0 < first.latency_totals_deleted <= first.minute_rollups_deleted  # a minute's total, its rows
    assert totals() == merged_rollups()
    assert {granularity for granularity, bucket in totals() if bucket < now - timedelta(days=20)} == {HOUR, DAY}
    assert any(granularity == MINUTE for granularity, _ in totals())  # the 3-day-old calls' minutes stay

    # Past the rollups' own retention: hours and days go too, and their totals with them.
    second = usage_retention(now=now + timedelta(days=420))

    assert second.complete
    assert not UsageRollup.objects.exists()
    assert not UsageLatencyRollup.objects.exists()


def _migration() -> Any:
    return importlib.import_module("gateway_stats.migrations.0004_usage_latency_rollup")


def test_the_migration_fills_the_totals_a_rollup_run_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    random_calls(120, start=hour_ago(26), span=timedelta(hours=25))
    usage_rollup()
    written = totals()
    # Rows made by hand: two in one bucket (added up), one without a histogram (an empty total, as a run writes).
    bucket = hour_ago(100).replace(minute=0)
    UsageRollup.objects.create(granularity=HOUR, bucket=bucket, requests=2, latency={"3": 1, "40": 1})
    UsageRollup.objects.create(granularity=HOUR, bucket=bucket, model="x", requests=3, latency={"40": 2, "41": 1})
    UsageRollup.objects.create(granularity=DAY, bucket=bucket.replace(hour=0) - timedelta(days=9), latency={})
    UsageLatencyRollup.objects.all().delete()
    migration = _migration()
    monkeypatch.setattr(migration, "_BATCH", 7)  # several batches on the vendors added up in Python

    migration.latency_totals_backfill(apps, SimpleNamespace(connection=connection))

    assert totals() == {
        **written,
        (HOUR, bucket): Counter({3: 1, 40: 3, 41: 1}),
        (DAY, bucket.replace(hour=0) - timedelta(days=9)): Counter(),
    }
    assert totals() == merged_rollups()


# --- what the statistics answer --------------------------------------------------------------------------


def _raw_percentiles(start: datetime, end: datetime, **filters: Any) -> list[float | None]:
    histogram = Counter(
        UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end, **filters).values_list(
            "latency_bucket", flat=True
        )
    )
    return percentiles(histogram, QUANTILES)


def test_unfiltered_percentiles_are_those_of_the_raw_calls(user: Any, other_user: Any) -> None:
    start, end = hour_ago(30), hour_ago(0) + timedelta(minutes=1)
    random_calls(300, start=start, span=timedelta(hours=29, minutes=50), users=(user.pk, other_user.pk))
    usage_rollup()
    call(started_at=hour_ago(0.3), latency_ms=25_000.0)  # the raw tail
    call(started_at=hour_ago(20), latency_ms=0.2)  # late: its buckets were rolled up already

    with CaptureQueriesContext(connection) as queries:
        summary = usage_summary(start=start, end=end, flt=EVERYONE)
    hourly = usage_time_series(start=start, end=end, interval=HOUR, group_by=None, flt=EVERYONE)
    per_model = usage_time_series(start=start, end=end, interval=HOUR, group_by="model", flt=EVERYONE)
    mine = usage_summary(start=start, end=end, flt=UsageFilter(scope_user_id=user.pk))

    assert any("usagelatencyrollup" in query["sql"] for query in queries.captured_queries)
    assert summary.totals.requests == 302
    assert summary.totals.latency_percentiles() == _raw_percentiles(start, end)
    assert summary.totals.latency == dict(Counter(UsageRecord.objects.values_list("latency_bucket", flat=True)))
    # Per bucket: the totals' histogram is the per-model series' (read from the per-dimension rows) added up.
    by_bucket: dict[datetime, Counter[int]] = {}
    for series in per_model.series:
        for bucket, numbers in series.points:
            by_bucket.setdefault(bucket, Counter()).update(numbers.latency)
    (single,) = hourly.series
    assert {bucket: Counter(numbers.latency) for bucket, numbers in single.points} == by_bucket
    for bucket, numbers in single.points:
        assert numbers.latency_percentiles() == _raw_percentiles(bucket, bucket + timedelta(hours=1))
    # A filtered view still reads its own rows.
    assert mine.totals.latency_percentiles() == _raw_percentiles(start, end, user_id=user.pk)
    # And everything equals the answer from the raw ledger alone (no rollup at all).
    UsageRollup.objects.all().delete()
    UsageLatencyRollup.objects.all().delete()
    UsageRollupState.objects.all().delete()
    raw = usage_summary(start=start, end=end, flt=EVERYONE)
    raw_hourly = usage_time_series(start=start, end=end, interval=HOUR, group_by=None, flt=EVERYONE)
    assert raw.totals == summary.totals
    assert raw_hourly.series == hourly.series


def test_a_minute_series_and_a_range_of_whole_days_read_the_totals_too() -> None:
    now = datetime.now(UTC)
    start = bucket_floor(now - timedelta(days=3), DAY)
    random_calls(90, start=start, span=timedelta(days=2, hours=20), seed=3)
    random_calls(30, start=hour_ago(2), span=timedelta(hours=1, minutes=50), seed=4)
    usage_rollup()

    days = usage_summary(start=start, end=bucket_floor(now, DAY), flt=EVERYONE)
    minutes = usage_time_series(start=hour_ago(2), end=hour_ago(0), interval=MINUTE, group_by=None, flt=EVERYONE)

    assert days.totals.latency_percentiles() == _raw_percentiles(start, bucket_floor(now, DAY))
    (single,) = minutes.series
    assert sum(numbers.requests for _, numbers in single.points) == 30
    for bucket, numbers in single.points:
        assert numbers.latency_percentiles() == _raw_percentiles(bucket, bucket + timedelta(minutes=1))
