"""Budget counters rebuilt from the ledger (proxy.limit_reconcile): lost counters come back exactly, low ones are
raised, high ones reported and kept, on the in-process backend and on Redis; the Celery task; Redis unreachable;
the in-process runner of the embedded default (at start-up, then periodically)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from apiforge import lifespan as lifespan_module
from gateway_stats.models import UsageRecord
from keys.periods import budget_period_bounds
from proxy import limit_reconciler
from proxy.edge import limits
from proxy.edge.limits import Limit
from proxy.limit_reconcile import limits_reconcile
from proxy.limit_reconciler import limit_reconciler_start, limit_reconciler_stop
from proxy.tasks import limits_reconcile as limits_reconcile_task
from tests.factories import ApiKeyFactory, UserFactory

pytestmark = pytest.mark.django_db
CLOSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture(params=["in_process", "redis"])
def store(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """The in-process limiter, or Redis under a key prefix of this test's own (skipped without REDIS_URL)."""
    if request.param == "redis":
        if not django_settings.REDIS_URL:
            pytest.skip("needs REDIS_URL")
        settings.CACHE_KEY_PREFIX = f"{django_settings.CACHE_KEY_PREFIX}:reconcile-{secrets.token_hex(4)}"
    else:
        settings.REDIS_URL = ""
    limits.limits_forget()
    yield request.param
    limits.limits_forget()


def _budget(key: str, limit: float, period: str) -> Limit:
    start, end = budget_period_bounds(period)
    return Limit(key=key, kind="budget", limit=limit, amount=0, window_s=end - start, period_end=end)


def _row(key: Any, tokens: int, cost: str, at: float) -> None:
    UsageRecord.objects.create(
        event_id=secrets.token_hex(16),
        request_id=secrets.token_hex(8),
        started_at=datetime.fromtimestamp(at, UTC),
        endpoint="/v1/chat/completions",
        status=200,
        key_id=key.pk,
        user_id=key.owner_id,
        total_tokens=tokens,
        cost=Decimal(cost),
    )


async def _closing(work: Any) -> Any:
    # The Redis limiter's client belongs to the loop it was made on: close it with this one.
    try:
        return await work
    finally:
        backend = limits.limiter()
        if isinstance(backend, limits.RedisLimiter):
            await backend.close()


def _counters(*budgets: Limit) -> dict[str, float | None]:
    return dict(asyncio.run(_closing(limits.budget_counters_get(budgets))).values)


def _set(budget: Limit, value: float) -> None:
    assert asyncio.run(_closing(limits.budget_counter_set(budget, value)))


def _flush(store: str) -> None:
    """Lose every limiter counter: the Redis keys of this test's prefix deleted, or the process's forgotten."""
    if store == "redis":
        client = redis.Redis.from_url(django_settings.REDIS_URL)
        for key in client.scan_iter(match=f"{django_settings.CACHE_KEY_PREFIX}:lim:*"):
            client.delete(key)
        client.close()
    limits.limits_forget()


@pytest.fixture
def spend() -> dict[str, Any]:
    """A user with a daily cost budget, two keys of theirs (one daily, one monthly), spend in the ledger, and
    a row of the previous day that counts for nothing."""
    user = UserFactory(budget_cost=Decimal("10"), budget_period="day")
    daily = ApiKeyFactory(owner=user, budget_tokens=1000, budget_cost=Decimal("5"), budget_period="day")
    monthly = ApiKeyFactory(owner=user, budget_cost=Decimal("50"), budget_period="month")
    ApiKeyFactory(owner=user)  # no budget: no counter
    ApiKeyFactory(budget_tokens=10, is_active=False)  # cannot spend: not reconciled
    day_start, _ = budget_period_bounds("day")
    _row(daily, 100, "0.25", day_start + 1)
    _row(daily, 50, "0.125", day_start + 2)
    _row(daily, 999, "3.5", day_start - 10)  # yesterday
    _row(monthly, 30, "0.5", day_start + 3)
    return {
        "daily_bt": _budget(f"k{daily.pk}:bt", 1000, "day"),
        "daily_bc": _budget(f"k{daily.pk}:bc", 5, "day"),
        "monthly_bc": _budget(f"k{monthly.pk}:bc", 50, "month"),
        "user_bc": _budget(f"u{user.pk}:bc", 10, "day"),
    }


def _expected(spend: dict[str, Any]) -> dict[str, float]:
    return {
        spend["daily_bt"].counter_key(): 150.0,
        spend["daily_bc"].counter_key(): 0.375,
        spend["monthly_bc"].counter_key(): 0.5,
        spend["user_bc"].counter_key(): 0.875,  # both keys' spend today, not yesterday's
    }


def test_lost_counters_are_rebuilt_exactly_from_the_ledger(store: str, spend: dict[str, Any]) -> None:
    budgets = [spend[name] for name in ("daily_bt", "daily_bc", "monthly_bc", "user_bc")]
    expected = _expected(spend)
    assert _counters(*budgets) == dict.fromkeys(expected)  # nothing counted yet (say: Redis was flushed)

    result = limits_reconcile()
    assert not result.unavailable
    assert result.checked == 4
    assert sorted(result.corrected) == sorted((key, None, value) for key, value in expected.items() if value)
    assert result.above == ()
    assert _counters(*budgets) == pytest.approx(expected)

    _flush(store)
    assert sorted(limits_reconcile().corrected) == sorted(result.corrected)
    assert _counters(*budgets) == pytest.approx(expected)
    again = limits_reconcile()  # nothing to correct any more
    assert (again.checked, again.corrected, again.above) == (4, (), ())


def test_a_rebuilt_counter_is_what_admit_enforces(store: str, spend: dict[str, Any]) -> None:
    limits_reconcile()
    spent = spend["daily_bt"]
    exhausted = Limit(spent.key, "budget", 150, 10, spent.window_s, spent.period_end)
    decision = asyncio.run(_closing(limits.admit([exhausted])))
    assert not decision.allowed
    assert decision.refused == exhausted


def test_a_counter_below_the_ledger_is_raised_and_one_above_is_reported_and_kept(
    store: str, spend: dict[str, Any]
) -> None:
    tokens, cost = spend["daily_bt"], spend["daily_bc"]
    _set(tokens, 40)  # below the ledger's 150 (e.g. calls served while Redis was unreachable)
    _set(cost, 2.5)  # above the ledger's 0.375 (reservations of calls in flight)
    result = limits_reconcile()
    assert (tokens.counter_key(), 40.0, 150.0) in result.corrected
    assert result.above == ((cost.counter_key(), 2.5, 0.375),)
    counters = _counters(tokens, cost)
    assert counters == {tokens.counter_key(): 150.0, cost.counter_key(): 2.5}


def test_a_counter_equal_to_the_ledger_within_float_error_is_left_alone(store: str, spend: dict[str, Any]) -> None:
    cost = spend["daily_bc"]
    _set(cost, 0.375 - 1e-12)  # what many INCRBYFLOATs of small costs may hold
    result = limits_reconcile()
    assert cost.counter_key() not in [key for key, _, _ in result.corrected]
    assert cost.counter_key() not in [key for key, _, _ in result.above]


def test_no_budget_anywhere_means_nothing_to_do(store: str) -> None:
    ApiKeyFactory(rpm_limit=10)
    result = limits_reconcile()
    assert (result.checked, result.corrected, result.above, result.unavailable) == (0, (), (), False)


def test_the_celery_task_runs_and_answers_what_it_corrected(store: str, spend: dict[str, Any]) -> None:
    answer = limits_reconcile_task.apply().get()
    assert answer["unavailable"] is False
    assert answer["checked"] == 4
    assert sorted(tuple(item) for item in answer["corrected"]) == sorted(
        (key, None, value) for key, value in _expected(spend).items() if value
    )


def test_the_run_logs_one_info_line(store: str, spend: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.limit_reconcile")
    limits_reconcile()
    lines = [r for r in caplog.records if r.name == "proxy.limit_reconcile"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert "4 budget counters checked, 4 corrected" in lines[0].getMessage()
    assert spend["daily_bt"].counter_key() in lines[0].getMessage()


def test_many_corrections_still_log_one_line_naming_the_first_ones(
    store: str, caplog: pytest.LogCaptureFixture
) -> None:
    day_start, _ = budget_period_bounds("day")
    for _ in range(12):
        _row(ApiKeyFactory(budget_tokens=1000, budget_cost=Decimal("5"), budget_period="day"), 10, "0.5", day_start)
    caplog.set_level(logging.INFO, logger="proxy.limit_reconcile")
    result = limits_reconcile()
    assert len(result.corrected) == 24
    (line,) = [r.getMessage() for r in caplog.records if r.name == "proxy.limit_reconcile"]
    assert "24 corrected" in line
    assert line.count(" -> ") == 20
    assert "and 4 more" in line


def test_unreachable_redis_is_reported_unavailable_with_one_warning_and_no_error(
    settings: Any, spend: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings.REDIS_URL = CLOSED
    limits.limits_forget()
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    answer = limits_reconcile_task.apply().get()
    assert answer == {"checked": 0, "corrected": [], "above": [], "unavailable": True}
    assert limits_reconcile().unavailable  # the breaker answers at once now
    assert time.monotonic() - started < 3.0
    warnings = [r for r in caplog.records if r.name == "proxy.edge.limits"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    info = [r.getMessage() for r in caplog.records if r.name == "proxy.limit_reconcile"]
    assert info == ["limits reconcile: the limiter's Redis is unavailable; 4 budget counters unchecked"] * 2


def test_the_counter_calls_answer_unavailable_on_an_unreachable_redis_and_never_raise(
    settings: Any, spend: dict[str, Any]
) -> None:
    settings.REDIS_URL = CLOSED
    tokens = spend["daily_bt"]
    limits.limits_forget()
    assert not asyncio.run(limits.budget_counter_set(tokens, 1.0))  # refused: the breaker opens
    assert not asyncio.run(limits.budget_counter_set(tokens, 1.0))  # the breaker is open: not asked
    assert asyncio.run(limits.budget_counters_raise([(tokens, 150.0)])).unavailable
    limits.limits_forget()
    assert asyncio.run(limits.budget_counters_raise([(tokens, 150.0)])).unavailable  # refused
    assert asyncio.run(limits.budget_counters_get([tokens])).unavailable  # the breaker is open
    assert asyncio.run(limits.budget_counters_raise([])).values == {}
    assert asyncio.run(limits.budget_counters_get([])).values == {}


@pytest.mark.django_db(transaction=True)
async def test_the_in_process_runner_reconciles_at_start_then_periodically_and_stops(
    settings: Any, spend: dict[str, Any]
) -> None:
    settings.REDIS_URL = ""
    settings.CELERY_TASK_ALWAYS_EAGER = True  # no broker: the serving process runs it
    settings.RATE_LIMIT_RECONCILE_S = 0.05
    assert "proxy.limits" in [hooks.app for hooks in lifespan_module._app_hooks()]
    tokens = spend["daily_bt"]
    try:
        await limit_reconciler_start()  # a restarted embedded server: its counters were empty
        assert (await limits.budget_counters_get([tokens])).values == {tokens.counter_key(): 150.0}
        limits.limits_forget()  # lost again: the next periodic run puts it back
        deadline = time.monotonic() + 5
        while (await limits.budget_counters_get([tokens])).values[tokens.counter_key()] is None:
            assert time.monotonic() < deadline, "the periodic run did not come"
            await asyncio.sleep(0.02)
        assert (await limits.budget_counters_get([tokens])).values == {tokens.counter_key(): 150.0}
    finally:
        await limit_reconciler_stop()
    limits.limits_forget()
    await asyncio.sleep(0.15)
    assert (await limits.budget_counters_get([tokens])).values == {tokens.counter_key(): None}  # stopped
    await limit_reconciler_stop()  # twice: nothing to stop


@pytest.mark.django_db(transaction=True)
async def test_the_asgi_lifespan_starts_the_runner_before_serving_and_stops_it(
    settings: Any, spend: dict[str, Any]
) -> None:
    settings.REDIS_URL = ""
    settings.CELERY_TASK_ALWAYS_EAGER = True
    tokens = spend["daily_bt"]
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    incoming.put_nowait({"type": "lifespan.startup"})
    running = asyncio.create_task(lifespan_module.lifespan({"type": "lifespan"}, incoming.get, send))
    deadline = time.monotonic() + 10
    while "lifespan.startup.complete" not in sent:
        assert not running.done(), f"the lifespan ended: {sent}"
        assert time.monotonic() < deadline, f"no startup: {sent}"
        await asyncio.sleep(0.01)
    # Started: the counters were rebuilt before the server said it could serve.
    assert (await limits.budget_counters_get([tokens])).values == {tokens.counter_key(): 150.0}
    incoming.put_nowait({"type": "lifespan.shutdown"})
    await asyncio.wait_for(running, timeout=10)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert limit_reconciler._task is None


async def test_the_runner_does_not_start_with_a_broker(settings: Any) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False  # celery beat runs proxy.limits_reconcile
    await limit_reconciler_start()
    await limit_reconciler_stop()
