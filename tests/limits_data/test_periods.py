"""Budget periods (keys.periods): where a day and a month start and end in BUDGET_TIMEZONE, DST days, month
ends, ``total``, and the cached current bounds rolling over when a period ends."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from keys.periods import TOTAL_END, budget_period_bounds, budget_period_compute


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", "2026-12-02T03:26:00+00:00", "2026-12-02T00:00:00+00:00", "2026-12-03T00:00:00+00:00"),
        ("day", "2026-12-02T00:00:00+00:00", "2026-12-02T00:00:00+00:00", "2026-12-03T00:00:00+00:00"),
        ("day", "2026-12-31T23:59:59.999+00:00", "2026-12-31T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("month", "2026-12-31T23:59:59+00:00", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("month", "2026-01-31T12:00:00+00:00", "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"),
        ("month", "2028-02-29T23:00:00+00:00", "2028-02-01T00:00:00+00:00", "2028-03-01T00:00:00+00:00"),
        ("month", "2026-03-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00", "2026-04-01T00:00:00+00:00"),
    ],
)
def test_days_and_months_roll_at_utc_midnight_and_on_the_first(period: str, now: str, start: str, end: str) -> None:
    assert tuple(map(_iso, budget_period_compute(period, _at(now), "UTC"))) == (start, end)


@pytest.mark.parametrize("tz_name", ["UTC", "Europe/Paris", "Pacific/Kiritimati"])
def test_the_total_period_never_rolls(tz_name: str) -> None:
    for now in ("1999-01-01T00:00:00+00:00", "2026-12-02T03:26:00+00:00", "2099-12-31T23:59:59+00:00"):
        assert budget_period_compute("total", _at(now), tz_name) == (0.0, TOTAL_END)
    assert _iso(TOTAL_END) == "2100-01-01T00:00:00+00:00"


def test_an_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError, match="week"):
        budget_period_compute("week", _at("2026-12-02T00:00:00+00:00"), "UTC")


def test_the_day_starts_at_local_midnight_in_the_budget_time_zone() -> None:
    # 23:30 UTC on 10 June is 01:30 on 11 June in Paris (UTC+2 in summer).
    now = _at("2026-06-10T23:30:00+00:00")

    assert tuple(map(_iso, budget_period_compute("day", now, "Europe/Paris"))) == (
        "2026-06-10T22:00:00+00:00",
        "2026-06-11T22:00:00+00:00",
    )
    assert tuple(map(_iso, budget_period_compute("month", now, "Europe/Paris"))) == (
        "2026-05-31T22:00:00+00:00",
        "2026-06-30T22:00:00+00:00",
    )
    assert tuple(map(_iso, budget_period_compute("day", now, "UTC"))) == (
        "2026-06-10T00:00:00+00:00",
        "2026-06-11T00:00:00+00:00",
    )


@pytest.mark.parametrize(
    ("now", "hours", "start"),
    [
        ("2026-03-29T12:00:00+00:00", 23, "2026-03-28T23:00:00+00:00"),  # clocks go forward at 02:00
        ("2026-10-25T12:00:00+00:00", 25, "2026-10-24T22:00:00+00:00"),  # clocks go back at 03:00
        ("2026-10-24T12:00:00+00:00", 24, "2026-10-23T22:00:00+00:00"),
    ],
)
def test_a_dst_day_in_paris_lasts_23_or_25_hours_from_midnight_to_midnight(now: str, hours: int, start: str) -> None:
    begin, end = budget_period_compute("day", _at(now), "Europe/Paris")

    assert _iso(begin) == start
    assert end - begin == hours * 3600
    # The next day starts where this one ends, at local midnight.
    assert budget_period_compute("day", end, "Europe/Paris")[0] == end
    assert datetime.fromtimestamp(end, ZoneInfo("Europe/Paris")).time() == time(0, 0)


def test_a_month_with_a_dst_change_keeps_its_local_midnights() -> None:
    begin, end = budget_period_compute("month", _at("2026-03-15T12:00:00+00:00"), "Europe/Paris")

    assert (_iso(begin), _iso(end)) == ("2026-02-28T23:00:00+00:00", "2026-03-31T22:00:00+00:00")
    assert end - begin == 31 * 86400 - 3600


@pytest.mark.parametrize("tz_name", ["UTC", "Europe/Paris", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"])
def test_consecutive_days_and_months_tile_a_year_without_gap_or_overlap(tz_name: str) -> None:
    # America/Santiago moves its clocks at midnight (6 September 2026 has no 00:00): the day then starts at the
    # change. Lord Howe moves them by half an hour.
    for period, steps in (("day", 366), ("month", 13)):
        start, end = budget_period_compute(period, _at("2026-01-01T12:00:00+00:00"), tz_name)
        for _ in range(steps):
            following = budget_period_compute(period, end, tz_name)
            assert following[0] == end, (period, _iso(end))
            assert budget_period_compute(period, end - 0.001, tz_name) == (start, end)
            if period == "day":
                assert 23 * 3600 <= end - start <= 25 * 3600
            start, end = following


def test_the_current_bounds_are_reused_within_a_period_and_roll_over_when_it_ends(settings: Any) -> None:
    settings.BUDGET_TIMEZONE = "UTC"
    end_of_day = _at("2026-12-03T00:00:00+00:00")

    first = budget_period_bounds("day", now=end_of_day - 3600)
    assert budget_period_bounds("day", now=end_of_day - 0.001) == first
    rolled = budget_period_bounds("day", now=end_of_day)

    assert (_iso(first[0]), _iso(first[1])) == ("2026-12-02T00:00:00+00:00", "2026-12-03T00:00:00+00:00")
    assert (_iso(rolled[0]), _iso(rolled[1])) == ("2026-12-03T00:00:00+00:00", "2026-12-04T00:00:00+00:00")
    # A clock that reads an earlier instant again (another caller's ``now``) gets that instant's period.
    assert budget_period_bounds("day", now=end_of_day - 60) == first
    assert budget_period_bounds("month", now=end_of_day) == budget_period_compute("month", end_of_day, "UTC")


def test_the_current_bounds_follow_the_budget_time_zone_setting(settings: Any) -> None:
    now = _at("2026-06-10T23:30:00+00:00")
    settings.BUDGET_TIMEZONE = "UTC"
    in_utc = budget_period_bounds("day", now=now)

    settings.BUDGET_TIMEZONE = "Europe/Paris"
    in_paris = budget_period_bounds("day", now=now)

    assert _iso(in_utc[0]) == "2026-06-10T00:00:00+00:00"
    assert _iso(in_paris[0]) == "2026-06-10T22:00:00+00:00"


def test_the_current_bounds_default_to_the_present() -> None:
    start, end = budget_period_bounds("day")
    now = datetime.now(UTC).timestamp()

    assert start <= now < end
    assert end - start <= timedelta(hours=25).total_seconds()
