"""Budget periods: when a key's (or a user's) ``day`` / ``month`` / ``total`` budget period starts and ends.

Periods roll at midnight and on the first of the month in ``BUDGET_TIMEZONE`` (UTC by default). ``total``
never rolls: it runs from the epoch to ``TOTAL_END``. The limiter keys a budget's counter by its period's
start, so a new period starts at zero by itself, on every worker at once.

The proxy asks for the current bounds on every limited call: they are computed once per period and time zone
and reused until the period ends (one comparison per call).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from django.conf import settings

from keys.policy import BudgetPeriod

# The end of the ``total`` period: 2100-01-01 UTC (epoch seconds). Far enough, and a valid Redis TTL.
TOTAL_END = 4102444800.0

_current: dict[tuple[str, str], tuple[float, float]] = {}


@lru_cache(maxsize=8)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def budget_period_compute(period: BudgetPeriod | str, now: float, tz_name: str) -> tuple[float, float]:
    """The (start, end) epoch seconds of the ``period`` that holds ``now``, in the time zone ``tz_name``."""
    if period == "total":
        return 0.0, TOTAL_END
    zone = _zone(tz_name)
    local = datetime.fromtimestamp(now, zone)
    if period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        following = (start + timedelta(days=1, hours=2)).replace(hour=0)  # 23 or 25 h days (DST) included
    elif period == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    # Wall-clock midnights, made aware again in the zone (fold=0): a DST change inside the period is counted.
    start = start.replace(tzinfo=zone)
    following = following.replace(tzinfo=zone)
    return start.timestamp(), following.timestamp()


def budget_period_bounds(period: BudgetPeriod | str, now: float | None = None) -> tuple[float, float]:
    """The (start, end) epoch seconds of the current ``period`` in ``BUDGET_TIMEZONE``; cached until it ends."""
    at = time.time() if now is None else now
    tz_name: str = settings.BUDGET_TIMEZONE
    cache_key = (period, tz_name)
    found = _current.get(cache_key)
    if found is not None and found[0] <= at < found[1]:
        return found
    bounds = budget_period_compute(period, at, tz_name)
    _current[cache_key] = bounds
    return bounds
