"""The admit stage's own behaviour, called directly: listings, renewals of long calls' leases, an unreachable
limiter failing open or closed, and the engine's housekeeping (sweeps, leases whose answer was lost)."""

from __future__ import annotations

import asyncio
import math
import time
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings as django_settings

from keys.policy import KeyPolicy
from proxy.edge import admit, limits
from proxy.edge.limits import Limit
from proxy.errors import ProxyError

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"
REDIS_URL = django_settings.REDIS_URL  # read before the fixture below turns it off


def policy(**limits_: Any) -> KeyPolicy:
    fields: dict[str, Any] = {
        "key_id": 901,
        "owner_id": 902,
        "prefix": "afk-test",
        "name": "t",
        "allowed_models": frozenset(),
        "allowed_routes": frozenset(),
        "rpm_limit": None,
        "tpm_limit": None,
        "max_concurrency": None,
        "budget_tokens": None,
        "budget_cost": None,
        "budget_period": "month",
    }
    fields.update(limits_)
    return KeyPolicy(**fields)


@pytest.fixture(autouse=True)
def _in_process(settings: Any) -> Any:
    settings.REDIS_URL = ""
    limits.limits_forget()
    yield
    limits.limits_forget()


async def test_a_listing_counts_against_the_owners_rpm_too() -> None:
    key = policy(user_rpm_limit=1)
    first = await admit.admit_listing(key)
    assert first is not None
    assert dict(first.headers)[b"x-ratelimit-limit-requests"] == b"1"
    with pytest.raises(ProxyError) as refused:
        await admit.admit_listing(key)
    assert refused.value.code == "rate_limit_exceeded"
    assert "on the user" in refused.value.message
    assert await admit.admit_listing(policy()) is None, "no limit: no limiter call"


async def test_a_long_call_renews_its_lease_until_it_finishes(settings: Any) -> None:
    settings.RATE_LIMIT_LEASE_TTL_S = 0.3
    admission = await admit.admit_route("r", None, policy(max_concurrency=1), None, None)
    assert admission is not None
    await asyncio.sleep(0.7)  # longer than the TTL: renewed at half of it, so the slot is still held
    with pytest.raises(ProxyError) as refused:
        await admit.admit_route("r", None, policy(max_concurrency=1), None, None)
    assert refused.value.code == "concurrency_limit_exceeded"
    admission.finish(_event())
    admission.finish(_event())  # once only
    assert await admit.admit_route("r", None, policy(max_concurrency=1), None, None) is not None


async def test_renewal_stops_after_the_longest_call(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.RATE_LIMIT_LEASE_TTL_S = 0.2
    monkeypatch.setattr(admit, "MAX_RENEWAL_S", 0.0)
    admission = await admit.admit_route("r", None, policy(max_concurrency=1), None, None)
    assert admission is not None
    await asyncio.sleep(0.5)  # no renewal past MAX_RENEWAL_S: the lease lapsed
    assert await admit.admit_route("r", None, policy(max_concurrency=1), None, None) is not None


async def test_an_unreachable_limiter_fails_open_by_default_and_closed_when_told(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.REDIS_URL = CLOSED_PORT_URL
    assert await admit.admit_listing(policy(rpm_limit=1)) is None, "fail open: served without limits"
    limits.limits_forget()  # the breaker would answer the next call without asking Redis
    assert await admit.admit_route("r", None, policy(max_concurrency=1), None, None) is None
    lost = limits.limiter()
    assert isinstance(lost, limits.RedisLimiter)
    assert [key for key, _ in lost._orphans] == [f"{settings.CACHE_KEY_PREFIX}:lim:k901:c"], "released later"
    settings.RATE_LIMIT_FAIL_OPEN = False
    with pytest.raises(ProxyError) as refused:
        await admit.admit_listing(policy(rpm_limit=1))
    assert refused.value.status == 429
    assert refused.value.code == "rate_limiter_unavailable"
    assert dict(refused.value.headers)[b"retry-after"] == str(math.ceil(settings.RATE_LIMIT_REDIS_RETRY_S)).encode()
    assert {r.levelname for r in caplog.records if "rate limits" in r.getMessage()} == {"WARNING"}


async def test_a_cost_budget_settles_to_the_real_cost() -> None:
    key = policy(budget_cost=Decimal("1"), budget_period="day")
    out: list[Limit] = []
    labels: list[str] = []
    admit._key_limits(key, out, labels, tokens=100, cost=0.6)
    admission = await admit._admit(out, labels)
    assert admission is not None
    assert admission.settles == {"k901:bc": "cost"}
    event = _event()
    admission.finish(event)  # cost 0: 0.6 refunded
    again = await admit._admit(out, labels)
    assert again is not None
    assert again.decision.remaining["k901:bc"] == pytest.approx(0.4)


def test_a_budget_limit_needs_its_period_end() -> None:
    with pytest.raises(ValueError, match="period_end"):
        Limit("k1:bt", "budget", 10).counter_key()


async def test_the_in_process_sweep_drops_old_windows_leases_and_periods() -> None:
    backend = limits._in_process
    now = time.time()
    await limits.admit([Limit("k:old:r", "requests", 5)], now=now - 300)
    await limits.admit([Limit("k:old:c", "concurrency", 5)], now=now - 300)
    await limits.admit([Limit("k:old:b", "budget", 5, window_s=10, period_end=now - 100)], now=now - 105)
    await limits.admit([Limit("k:new:r", "requests", 5)], now=now)
    backend._sweep(now)
    assert list(backend._windows) == ["k:new:r"]
    assert backend._leases == {}
    assert backend._budgets == {}


@pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL")
async def test_leases_taken_while_the_answer_was_lost_are_released_when_redis_answers(settings: Any) -> None:
    import redis.asyncio

    settings.REDIS_URL = REDIS_URL
    backend = limits.limiter()
    assert isinstance(backend, limits.RedisLimiter)
    raw = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    key = f"{settings.CACHE_KEY_PREFIX}:lim:k:orphan:c"
    try:
        await raw.zadd(key, {"lost:0": time.time() + 60})  # what an admit whose answer timed out left behind
        backend._orphans.append((key, ["lost:0"]))
        assert (await limits.admit([Limit("k:orphan:r", "requests", 5)])).allowed
        for _ in range(50):
            if not await raw.zcard(key):
                break
            await asyncio.sleep(0.02)
        assert await raw.zcard(key) == 0
        with pytest.raises(Exception, match="(?i)err|script|number"):
            await backend._batched("admit", [key], ["not-a-number"])  # a script error reaches its caller only
    finally:
        await raw.delete(key)
        await raw.aclose()
        await backend.close()


def _event() -> Any:
    from gateway_stats.usage import UsageEvent

    return UsageEvent(request_id="r", endpoint="/v1/models", status=200)
