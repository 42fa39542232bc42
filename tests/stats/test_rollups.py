"""Rollups: sums of the raw rows, idempotent, late-data safe, percentiles that survive merging, one run at a
time, range re-runs, retention."""

from __future__ import annotations

import math
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from celery.exceptions import Retry

from gateway_stats import rollups
from gateway_stats.histogram import RESOLUTION
from gateway_stats.models import UsageRecord, UsageRollup, UsageRollupState
from gateway_stats.rollups import (
    DAY,
    HOUR,
    MINUTE,
    bucket_floor,
    retention_task,
    rollup_lock,
    rollup_task,
    usage_retention,
    usage_rollup,
    usage_rollup_range,
    usage_watermark,
)
from gateway_stats.stats import UsageFilter, usage_summary
from tests.stats.conftest import call, hour_ago, random_calls

pytestmark = pytest.mark.django_db

GRANULARITIES = (MINUTE, HOUR, DAY)
EVERYONE = UsageFilter(scope_user_id=None)


def _blank() -> dict[str, Any]:
    return {
        "requests": 0,
        "errors_4xx": 0,
        "errors_5xx": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost": Decimal(0),
        "request_bytes": 0,
        "response_bytes": 0,
        "latency": Counter(),
    }


def expected_from_raw(granularity: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rollup rows a granularity must hold, computed here from the raw rows directly."""
    result: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in UsageRecord.objects.all():
        key = (bucket_floor(row.started_at, granularity), row.key_id, row.user_id, row.model, row.upstream, row.route)
        numbers = result.setdefault(key, _blank())
        numbers["requests"] += 1
        numbers["errors_4xx"] += 400 <= row.status < 500
        numbers["errors_5xx"] += row.status >= 500
        numbers["prompt_tokens"] += row.prompt_tokens
        numbers["completion_tokens"] += row.completion_tokens
        numbers["cost"] += row.cost
        numbers["request_bytes"] += row.request_bytes
        numbers["response_bytes"] += row.response_bytes
        numbers["latency"][row.latency_bucket] += 1
    return result


def rolled(granularity: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    result: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in UsageRollup.objects.filter(granularity=granularity):
        key = (row.bucket, row.key_id, row.user_id, row.model, row.upstream, row.route)
        assert key not in result, f"two {granularity} rows for {key}"
        result[key] = {
            "requests": row.requests,
            "errors_4xx": row.errors_4xx,
            "errors_5xx": row.errors_5xx,
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "cost": row.cost,
            "request_bytes": row.request_bytes,
            "response_bytes": row.response_bytes,
            "latency": Counter({int(index): count for index, count in row.latency.items()}),
        }
    return result


def snapshot() -> list[tuple[Any, ...]]:
    return sorted(
        UsageRollup.objects.values_list(
            "granularity", "bucket", "key_id", "user_id", "model", "upstream", "route", "requests", "cost", "latency"
        ).order_by(),
        key=repr,
    )


def assert_rollups_match_raw() -> None:
    for granularity in GRANULARITIES:
        assert rolled(granularity) == expected_from_raw(granularity), granularity


def test_every_rollup_equals_the_sums_over_its_raw_rows() -> None:
    random_calls(300, start=hour_ago(30), span=timedelta(hours=29, minutes=30))

    result = usage_rollup()

    assert result.ran
    assert result.minutes > 0
    assert result.hours > 0
    assert result.days >= 2
    assert_rollups_match_raw()
    totals = expected_from_raw(DAY).values()
    assert sum(row.requests for row in UsageRollup.objects.filter(granularity=HOUR)) == 300
    assert sum((row.cost for row in UsageRollup.objects.filter(granularity=DAY)), Decimal(0)) == sum(
        (numbers["cost"] for numbers in totals), Decimal(0)
    )


def test_running_the_rollup_twice_changes_nothing() -> None:
    random_calls(120, start=hour_ago(5), span=timedelta(hours=4))
    usage_rollup()
    first = snapshot()

    usage_rollup()
    usage_rollup_range(start=hour_ago(6), end=hour_ago(0))

    assert snapshot() == first
    assert_rollups_match_raw()


def test_a_late_record_is_counted_when_its_buckets_are_recomputed() -> None:
    random_calls(50, start=hour_ago(3), span=timedelta(hours=2))
    usage_rollup()
    late_start = hour_ago(26) + timedelta(seconds=17)  # a bucket (minute, hour and day) rolled up already
    call(started_at=hour_ago(2) + timedelta(seconds=3), prompt_tokens=1000)
    call(started_at=late_start, prompt_tokens=777, completion_tokens=1, status=502)

    result = usage_rollup()

    assert result.ran
    assert_rollups_match_raw()
    minute = UsageRollup.objects.get(granularity=MINUTE, bucket=bucket_floor(late_start, MINUTE))
    assert (minute.requests, minute.prompt_tokens, minute.errors_5xx) == (1, 777, 1)
    assert UsageRollup.objects.filter(granularity=HOUR, bucket=bucket_floor(late_start, HOUR)).exists()


def test_a_row_committed_after_the_watermark_it_predates_is_picked_up_by_the_overlap() -> None:
    random_calls(20, start=hour_ago(2), span=timedelta(hours=1))
    usage_rollup()
    watermark = usage_watermark()
    assert watermark is not None
    # Its transaction stamped ingested_at before the last run's watermark but committed after that run read.
    call(started_at=hour_ago(1.5), ingested_at=watermark - timedelta(seconds=20), prompt_tokens=4242)

    usage_rollup()

    assert_rollups_match_raw()


def test_merged_percentiles_match_the_exact_ones_within_the_histogram_resolution() -> None:
    records = random_calls(400, start=hour_ago(50), span=timedelta(hours=49, minutes=20), seed=11)
    usage_rollup()
    records += random_calls(40, start=hour_ago(0.5), span=timedelta(minutes=20), seed=12)  # the tail
    start, end = hour_ago(50), hour_ago(0) + timedelta(minutes=1)

    totals = usage_summary(start=start, end=end, flt=EVERYONE).totals

    latencies = sorted(record.latency_ms for record in records)
    assert totals.requests == len(records)
    for quantile, measured in zip((0.5, 0.95, 0.99), totals.latency_percentiles(), strict=True):
        exact = latencies[max(1, math.ceil(quantile * len(latencies))) - 1]
        assert measured is not None
        assert abs(measured - exact) <= exact * RESOLUTION, (quantile, measured, exact)


def test_a_second_run_while_one_holds_the_lock_does_nothing() -> None:
    random_calls(10, start=hour_ago(2), span=timedelta(hours=1))
    holding, release = threading.Event(), threading.Event()

    def first_run() -> None:
        with rollup_lock(60) as acquired:
            assert acquired
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert holding.wait(10)
        second = usage_rollup()
        ranged = usage_rollup_range(start=hour_ago(2), end=hour_ago(0))
    finally:
        release.set()
        thread.join(10)

    assert (second.ran, second.reason) == (False, "locked")
    assert (ranged.ran, ranged.reason) == (False, "locked")
    assert not UsageRollup.objects.exists()
    assert usage_rollup().ran  # released: the next run goes ahead
    assert_rollups_match_raw()


def test_a_range_rerun_recomputes_rows_changed_by_hand() -> None:
    records = random_calls(60, start=hour_ago(4), span=timedelta(hours=3))
    usage_rollup()
    UsageRecord.objects.filter(pk=records[0].pk).update(prompt_tokens=123_456)
    UsageRecord.objects.filter(pk=records[1].pk).delete()
    assert rolled(MINUTE) != expected_from_raw(MINUTE)

    result = rollup_task.apply(
        kwargs={"start": hour_ago(5).isoformat(), "end": hour_ago(0).replace(tzinfo=None).isoformat()}
    )

    assert result.successful()
    assert_rollups_match_raw()


def test_a_range_rerun_before_any_run_has_nothing_to_correct() -> None:
    random_calls(5, start=hour_ago(2), span=timedelta(hours=1))

    result = usage_rollup_range(start=hour_ago(3), end=hour_ago(0))

    assert (result.ran, result.reason) == (False, "no rollup has run yet")
    assert not UsageRollup.objects.exists()


def test_the_range_task_refuses_half_a_range_and_bad_dates() -> None:
    usage_rollup()
    with pytest.raises(ValueError, match="both start and end"):
        rollup_task.apply(kwargs={"start": hour_ago(1).isoformat()}, throw=True)
    with pytest.raises(ValueError, match="not an ISO 8601"):
        rollup_task.apply(kwargs={"start": "yesterday", "end": hour_ago(0).isoformat()}, throw=True)


def test_the_range_task_retries_while_another_run_holds_the_lock() -> None:
    usage_rollup()
    with rollup_lock(60), pytest.raises(Retry, match="Retry in 30"):
        rollup_task.apply(kwargs={"start": hour_ago(2).isoformat(), "end": hour_ago(1).isoformat()}, throw=True)


def test_the_beat_task_rolls_up_and_an_empty_ledger_starts_the_watermark_at_now() -> None:
    before = datetime.now(UTC)
    assert rollup_task.apply().successful()
    watermark = usage_watermark()
    assert watermark is not None
    assert watermark >= before
    assert not UsageRollup.objects.exists()

    call(started_at=hour_ago(1))
    rollup_task.apply()

    assert_rollups_match_raw()


def test_a_backlog_is_caught_up_in_bounded_windows() -> None:
    old = datetime.now(UTC) - timedelta(hours=13)
    for hours in (0, 7, 12):
        call(started_at=old + timedelta(hours=hours), ingested_at=old + timedelta(hours=hours, seconds=1))

    first = usage_rollup()
    second = usage_rollup()
    third = usage_rollup()

    assert first.watermark == old + timedelta(seconds=1) + rollups.MAX_WINDOW
    assert second.watermark == first.watermark + rollups.MAX_WINDOW
    assert third.watermark is not None
    assert third.watermark > second.watermark
    assert_rollups_match_raw()
    assert UsageRollupState.objects.count() == 1


def _rollup(granularity: str, bucket: datetime) -> UsageRollup:
    return UsageRollup.objects.create(granularity=granularity, bucket=bucket, requests=1, latency={"3": 1})


def test_retention_deletes_old_raw_rows_in_batches_and_keeps_the_rollups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollups, "RETENTION_BATCH", 3)
    now = datetime.now(UTC)
    old = [call(started_at=now - timedelta(days=32, minutes=i)) for i in range(7)]
    kept = [call(started_at=now - timedelta(days=28, minutes=i)) for i in range(2)]
    usage_rollup()
    old_minute = _rollup(MINUTE, bucket_floor(now - timedelta(days=40), MINUTE))
    old_hour = _rollup(HOUR, bucket_floor(now - timedelta(days=40), HOUR))
    ancient = [_rollup(HOUR, now - timedelta(days=401)), _rollup(DAY, now - timedelta(days=402))]

    result = retention_task.apply()

    assert result.successful()
    remaining = set(UsageRecord.objects.values_list("pk", flat=True))
    assert remaining == {record.pk for record in kept}
    assert not UsageRollup.objects.filter(pk=old_minute.pk).exists()
    assert UsageRollup.objects.filter(pk=old_hour.pk).exists()
    assert not UsageRollup.objects.filter(pk__in=[row.pk for row in ancient]).exists()
    # The rollups of the deleted rows' time stay (hours and days; the 32-day-old rows were never rolled into
    # frozen buckets, the 28-day-old ones were).
    assert UsageRollup.objects.filter(granularity=DAY).exists()
    assert len(old) == 7


def test_retention_out_of_time_stops_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollups, "RETENTION_BATCH", 2)
    now = datetime.now(UTC)
    for i in range(5):
        call(started_at=now - timedelta(days=35, minutes=i))

    first = usage_retention(budget_s=0)
    second = usage_retention()

    assert (first.raw_deleted, first.complete) == (2, False)
    assert (second.raw_deleted, second.complete) == (3, True)
    assert not UsageRecord.objects.exists()


def test_buckets_past_raw_retention_are_frozen() -> None:
    now = datetime.now(UTC)
    call(started_at=now - timedelta(days=31))  # raw row still there (retention has not run), bucket frozen

    usage_rollup()

    assert not UsageRollup.objects.exists()
