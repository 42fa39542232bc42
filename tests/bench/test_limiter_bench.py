"""The limiter (proxy.edge.limits): what a limited request pays to be admitted and settled, and what an unlimited
one pays (nothing: ``admit([])`` must be about free).

A typical limited request checks four limits of its key at once: rpm, tpm, concurrency and a monthly token
budget (the counter names of issue 12: ``k{id}:r``, ``k{id}:t``, ``k{id}:c``, ``k{id}:bt``), with limits far
above what a benchmark reaches, so every round is admitted and settled (tokens and budget reconciled with the
real usage, the concurrency slot released). The in-process backend is driven without an event loop and fails
if it ever suspends (it takes a lock and touches dicts, nothing else); the Redis backend is the real round trip
(one Lua script for the admit, one for the settle), against ``REDIS_URL`` (skipped without it), under a key
prefix of its own inside this run's ``CACHE_KEY_PREFIX`` (the suite removes the run's keys after each test).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings

from keys.periods import budget_period_bounds
from proxy.edge import limits
from proxy.edge.limits import Decision, Limit, admit, settle
from tests.bench.conftest import run_without_suspending

pytestmark = pytest.mark.bench

ESTIMATE = 25  # tokens reserved before the call: prompt estimate + max_tokens
ACTUAL = 17  # tokens the answer really used (the settle refunds the difference)
_key_ids = itertools.count(1)


def _typical_limits(key_id: int) -> list[Limit]:
    """The four limits of a key with rpm, tpm, concurrency and a monthly token budget, set never to trigger."""
    start, end = budget_period_bounds("month")
    return [
        Limit(key=f"k{key_id}:r", kind="requests", limit=10_000_000),
        Limit(key=f"k{key_id}:t", kind="tokens", limit=10_000_000_000, amount=ESTIMATE),
        Limit(key=f"k{key_id}:c", kind="concurrency", limit=100_000),
        Limit(key=f"k{key_id}:bt", kind="budget", limit=1e15, amount=ESTIMATE, window_s=end - start, period_end=end),
    ]


def _refused_limits(key_id: int) -> list[Limit]:
    """The same four limits with the rpm already spent (``_exhaust`` fills it): the request is refused."""
    typical = _typical_limits(key_id)
    return [Limit(key=typical[0].key, kind="requests", limit=1), *typical[1:]]


async def _admit_and_settle(chosen: list[Limit]) -> Decision:
    decision = await admit(chosen)
    actual = {chosen[1].key: ACTUAL, chosen[3].key: ACTUAL}
    await settle(decision, actual)
    return decision


@pytest.fixture
def in_process(settings: Any) -> Iterator[None]:
    settings.REDIS_URL = ""
    limits.limits_forget()
    yield
    limits.limits_forget()


@pytest.fixture
def redis_loop(settings: Any) -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop for the Redis backend (one for all rounds, its client closed at the end), under a prefix
    of its own inside this run's CACHE_KEY_PREFIX."""
    if not django_settings.REDIS_URL:
        pytest.skip("needs REDIS_URL")
    settings.CACHE_KEY_PREFIX = f"{django_settings.CACHE_KEY_PREFIX}:limiter-bench"
    limits.limits_forget()
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        chosen = limits.limiter()
        if isinstance(chosen, limits.RedisLimiter):
            loop.run_until_complete(chosen.close())
        loop.close()
        limits.limits_forget()


def test_admit_without_limits_is_free(benchmark):
    """An unlimited key, user, model and route: no backend asked, no suspension, nothing reserved."""
    decision = benchmark(lambda: run_without_suspending(admit([])))
    assert decision.allowed
    assert decision.backend is None
    assert decision.lease is None


def test_admit_and_settle_of_a_typical_limited_request_in_process(benchmark, in_process):
    chosen = _typical_limits(next(_key_ids))
    decision = benchmark(lambda: run_without_suspending(_admit_and_settle(chosen)))
    assert decision.allowed
    assert isinstance(decision.backend, limits.InProcessLimiter)
    assert set(decision.remaining) == {limit.key for limit in chosen}
    # every round released its slot: the next request sees the concurrency limit untouched
    after = run_without_suspending(admit(chosen))
    assert after.remaining[chosen[2].key] == 100_000 - 1


def test_refused_request_in_process(benchmark, in_process):
    chosen = _refused_limits(next(_key_ids))
    assert run_without_suspending(admit(chosen)).allowed
    decision = benchmark(lambda: run_without_suspending(admit(chosen)))
    assert not decision.allowed
    assert decision.refused == chosen[0]
    assert decision.retry_after_s >= 1


@pytest.mark.redis
def test_admit_and_settle_of_a_typical_limited_request_on_redis(benchmark, redis_loop):
    """Two round trips: the admit (the one a request waits for) and the settle (off the response path)."""
    chosen = _typical_limits(next(_key_ids))
    decision = benchmark(lambda: redis_loop.run_until_complete(_admit_and_settle(chosen)))
    assert decision.allowed
    assert not decision.unavailable
    assert isinstance(decision.backend, limits.RedisLimiter)
    after = redis_loop.run_until_complete(admit(chosen))
    assert after.remaining[chosen[2].key] == 100_000 - 1


@pytest.mark.redis
def test_admit_alone_of_a_typical_limited_request_on_redis(benchmark, redis_loop):
    """The round trip a limited request waits for before it is forwarded (its settle runs after the answer).
    The rounds' leases stay held until the end (their TTL), far below the concurrency limit."""
    chosen = _typical_limits(next(_key_ids))
    decision = benchmark(lambda: redis_loop.run_until_complete(admit(chosen)))
    assert decision.allowed
    assert not decision.unavailable


@pytest.mark.redis
def test_refused_request_on_redis(benchmark, redis_loop):
    chosen = _refused_limits(next(_key_ids))
    assert redis_loop.run_until_complete(admit(chosen)).allowed
    decision = benchmark(lambda: redis_loop.run_until_complete(admit(chosen)))
    assert not decision.allowed
    assert not decision.unavailable
    assert decision.refused == chosen[0]
