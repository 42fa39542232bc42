"""Budget counters rebuilt from the ledger: ``limits_reconcile()`` (beat: ``proxy.limits_reconcile`` every
``RATE_LIMIT_RECONCILE_S``; in-process without a broker, ``proxy.limit_reconciler``).

The limiter's budget counters (``k{id}:bt``, ``k{id}:bc``, ``u{id}:bc`` of the current period, see
``proxy.edge.admit``) live in Redis or in the serving process; the ledger (``UsageRecord``) is the source of
truth. When the counters are lost (Redis flushed or restarted, the embedded server restarted) or fell behind
(calls served while the limiter's Redis was unreachable, fail-open), this puts them back:

- every usable key with ``budget_tokens`` / ``budget_cost`` and every active user with ``budget_cost``: the
  ledger's ``total_tokens`` / ``cost`` since the start of the current period (``keys.periods``), one grouped
  query for the keys and one for the users, whatever their numbers and periods;
- a counter missing (with spend in the ledger) or below the ledger's sum is raised to it; a counter above it is
  reported and left alone: it holds the reservations of calls in flight, and charges whose ledger rows have
  not landed yet.

Raising is atomic per counter (``limits.budget_counters_raise`` keeps whichever is higher), so a reservation
made between the read and the write is kept whenever the counter already holds more; one made on a counter
below the ledger is absorbed until its own ledger row lands, and the next run raises the counter again. Runs
are idempotent: two at once (two beats) do no harm, so no lock is taken.

Bound: the ledger's raw rows are kept ``USAGE_RAW_RETENTION_DAYS``. A period that started before that (a
``total`` budget, a month with a shorter retention) is rebuilt from the rows still kept: a lower bound, which
never raises a counter above what was really spent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db.models import Q, Sum

from accounts.models import User
from gateway_stats.models import UsageRecord
from keys.periods import budget_period_bounds
from keys.selectors import key_budgets
from proxy.edge import limits
from proxy.edge.limits import Limit

logger = logging.getLogger(__name__)

# Cost counters are floats (INCRBYFLOAT of many costs), the ledger's costs decimals: they agree to this. Token
# counters hold whole numbers exactly.
_COST_REL_TOL = 1e-9
_COST_ABS_TOL = 1e-9
# Counters listed by name in the log line (the rest counted).
_LOGGED = 20


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What a run did: ``checked`` counters compared with the ledger; ``corrected`` (counter key, was, now),
    was None for a missing counter; ``above`` (counter key, counter, ledger) left alone; ``unavailable`` when
    the limiter's Redis could not be asked (nothing corrected)."""

    checked: int = 0
    corrected: tuple[tuple[str, float | None, float], ...] = ()
    above: tuple[tuple[str, float, float], ...] = ()
    unavailable: bool = False
    elapsed_ms: float = field(default=0.0, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "corrected": [list(item) for item in self.corrected],
            "above": [list(item) for item in self.above],
            "unavailable": self.unavailable,
        }


@dataclass(frozen=True, slots=True)
class _Budget:
    limit: Limit
    what: str  # "tokens" or "cost": the ledger column summed
    owner: int  # key id or user id
    period: str


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _budget(key: str, limit: float, period: str, now: float) -> Limit:
    start, end = budget_period_bounds(period, now)
    return Limit(key=key, kind="budget", limit=limit, amount=0, window_s=end - start, period_end=end)


def _ledger_sums(column: str, budgets: list[_Budget], now: float) -> dict[tuple[int, str], float]:
    """(owner id, "tokens" | "cost") -> the ledger's sum over the owner's current period: ONE query grouped by
    ``column``, a filtered sum per period in use (a row counts only from its owner's period start on)."""
    if not budgets:
        return {}
    periods = sorted({budget.period for budget in budgets})
    bounds = {period: budget_period_bounds(period, now) for period in periods}
    sums: dict[str, Any] = {}
    for period, (start, end) in bounds.items():
        window = Q(started_at__gte=_moment(start), started_at__lt=_moment(end))
        sums[f"tokens_{period}"] = Sum("total_tokens", filter=window)
        sums[f"cost_{period}"] = Sum("cost", filter=window)
    owners = sorted({budget.owner for budget in budgets})
    earliest = min(start for start, _ in bounds.values())
    rows = (
        UsageRecord.objects.filter(**{f"{column}__in": owners}, started_at__gte=_moment(earliest))
        .order_by()
        .values(column)
        .annotate(**sums)
    )
    found: dict[tuple[int, str], float] = {}
    period_of = {(budget.owner, budget.what): budget.period for budget in budgets}
    for row in rows:
        for what in ("tokens", "cost"):
            owner_period = period_of.get((row[column], what))
            if owner_period is not None:
                value: int | Decimal | None = row[f"{what}_{owner_period}"]
                found[(row[column], what)] = float(value or 0)
    return found


def _key_budgets(now: float) -> list[_Budget]:
    out: list[_Budget] = []
    for key in key_budgets():
        if key.budget_tokens is not None:
            limit = _budget(f"k{key.key_id}:bt", key.budget_tokens, key.budget_period, now)
            out.append(_Budget(limit, "tokens", key.key_id, key.budget_period))
        if key.budget_cost is not None:
            limit = _budget(f"k{key.key_id}:bc", float(key.budget_cost), key.budget_period, now)
            out.append(_Budget(limit, "cost", key.key_id, key.budget_period))
    return out


def _user_budgets(now: float) -> list[_Budget]:
    rows = (
        User.objects.filter(is_active=True, budget_cost__isnull=False)
        .order_by("id")
        .values_list("id", "budget_cost", "budget_period")
    )
    return [
        _Budget(_budget(f"u{user_id}:bc", float(cost or 0), period, now), "cost", user_id, period)
        for user_id, cost, period in rows
    ]


def _close(limit: Limit, counter: float, ledger: float) -> bool:
    if limit.key.endswith(":bt"):
        return abs(counter - ledger) < 0.5
    return math.isclose(counter, ledger, rel_tol=_COST_REL_TOL, abs_tol=_COST_ABS_TOL)


async def _apply(targets: list[tuple[Limit, float]], now: float) -> ReconcileResult:
    """Compare the counters with the ledger's sums and raise the ones below it (the limiter's own loop-bound
    client is made on this run's loop and closed with it)."""
    try:
        read = await limits.budget_counters_get([limit for limit, _ in targets])
        if read.unavailable:
            return ReconcileResult(checked=0, unavailable=True)
        below: list[tuple[Limit, float]] = []
        above: list[tuple[str, float, float]] = []
        for limit, ledger in targets:
            key = limit.counter_key()
            counter = read.values.get(key)
            if counter is None:
                if ledger > 0:
                    below.append((limit, ledger))
            elif counter < ledger and not _close(limit, counter, ledger):
                below.append((limit, ledger))
            elif counter > ledger and not _close(limit, counter, ledger):
                above.append((key, counter, ledger))
        raised = await limits.budget_counters_raise(below, now)
        if raised.unavailable:
            return ReconcileResult(checked=len(targets), above=tuple(above), unavailable=True)
        corrected: list[tuple[str, float | None, float]] = []
        for limit, ledger in below:
            key = limit.counter_key()
            was = raised.values.get(key)
            if was is None or was < ledger:  # not raised meanwhile by someone else
                corrected.append((key, was, ledger))
        return ReconcileResult(checked=len(targets), corrected=tuple(corrected), above=tuple(above))
    finally:
        backend = limits.limiter()
        if isinstance(backend, limits.RedisLimiter):
            await backend.close()


def _targets(budgets: Iterable[_Budget], sums: dict[tuple[int, str], float]) -> list[tuple[Limit, float]]:
    return [(budget.limit, sums.get((budget.owner, budget.what), 0.0)) for budget in budgets]


def _listed(items: tuple[tuple[Any, ...], ...], sign: str) -> str:
    # One line whatever the numbers: the first _LOGGED items, then how many more.
    shown = ", ".join(f"{key} {first} {sign} {second}" for key, first, second in items[:_LOGGED])
    more = len(items) - _LOGGED
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"


def limits_reconcile(now: float | None = None) -> ReconcileResult:
    """Rebuild the budget counters of the current periods from the ledger (see the module docstring); logs one
    INFO line. Sync (Celery, or a thread of the embedded server): the limiter calls run on a loop of their own.
    Never raises for Redis (``unavailable``); database errors propagate to the caller."""
    started = time.monotonic()
    at = time.time() if now is None else now
    key_side, user_side = _key_budgets(at), _user_budgets(at)
    targets = _targets(key_side, _ledger_sums("key_id", key_side, at))
    targets += _targets(user_side, _ledger_sums("user_id", user_side, at))
    result = asyncio.run(_apply(targets, at)) if targets else ReconcileResult()
    elapsed_ms = (time.monotonic() - started) * 1000
    if result.unavailable:
        logger.info("limits reconcile: the limiter's Redis is unavailable; %d budget counters unchecked", len(targets))
    else:
        logger.info(
            "limits reconcile: %d budget counters checked, %d corrected %s, %d above the ledger kept %s (%.0f ms)",
            result.checked,
            len(result.corrected),
            _listed(result.corrected, "->"),
            len(result.above),
            _listed(result.above, "> ledger"),
            elapsed_ms,
        )
    return ReconcileResult(
        checked=result.checked,
        corrected=result.corrected,
        above=result.above,
        unavailable=result.unavailable,
        elapsed_ms=elapsed_ms,
    )
