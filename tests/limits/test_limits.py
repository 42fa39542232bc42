"""The limiter engine (proxy.edge.limits): exact limits under concurrency, sliding windows, all-or-nothing,
leases, budgets and their settlement, on the in-process backend and on Redis (the same tests, both backends)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.edge.limits import Limit, admit, release, renew, settle

T0 = 1_800_000_000.0  # a minute boundary (divisible by 60): t = T0 + 59.9 is just before the next minute


async def test_n_limit_with_3n_concurrent_admits_allows_exactly_n(backend: str) -> None:
    rpm = Limit(key="k:1:rpm", kind="requests", limit=25, amount=1)
    decisions = await asyncio.gather(*(admit([rpm]) for _ in range(75)))
    assert sum(d.allowed for d in decisions) == 25
    refused = [d for d in decisions if not d.allowed]
    assert all(d.refused == rpm and d.retry_after_s >= 1 and not d.unavailable for d in refused)


async def test_sliding_window_holds_across_the_minute_boundary_and_frees_after_the_window(backend: str) -> None:
    rpm = Limit(key="k:2:rpm", kind="requests", limit=5, amount=1)
    assert all([(await admit([rpm], now=T0 + 59.9)).allowed for _ in range(5)])
    late = await admit([rpm], now=T0 + 60.1)  # a fixed-window counter would allow 5 more here
    assert not late.allowed
    assert late.retry_after_s == 60  # the bucket of second 59 leaves the window at T0 + 120
    assert not (await admit([rpm], now=T0 + 119.95)).allowed  # never early
    back = await admit([rpm], now=T0 + 120.0)
    assert back.allowed
    assert back.remaining["k:2:rpm"] == 4


async def test_remaining_and_reset_are_reported_per_limit(backend: str) -> None:
    rpm = Limit(key="k:3:rpm", kind="requests", limit=10, amount=1)
    tpm = Limit(key="k:3:tpm", kind="tokens", limit=1000, amount=300)
    decision = await admit([rpm, tpm], now=T0 + 10.5)
    assert decision.allowed
    assert decision.remaining == {"k:3:rpm": 9, "k:3:tpm": 700}
    assert decision.reset_s == {"k:3:rpm": 61, "k:3:tpm": 61}  # second 10 leaves the window at T0 + 71


async def test_one_refusing_limit_reserves_nothing_on_the_others(backend: str) -> None:
    rpm = Limit(key="k:4:rpm", kind="requests", limit=100, amount=1)
    tpm = Limit(key="k:4:tpm", kind="tokens", limit=1000, amount=600)
    assert (await admit([rpm, tpm], now=T0)).allowed
    refused = await admit([rpm, tpm], now=T0 + 1)
    assert not refused.allowed
    assert refused.refused == tpm
    assert refused.lease is None
    # the refused request took nothing on rpm: 99 requests of 1 token still fit
    small = Limit(key="k:4:tpm", kind="tokens", limit=1000, amount=1)
    allowed = [(await admit([rpm, small], now=T0 + 2)).allowed for _ in range(99)]
    assert all(allowed)
    assert not (await admit([rpm, small], now=T0 + 2)).allowed


async def test_concurrency_slots_come_back_when_released(backend: str) -> None:
    slots = Limit(key="k:5:conc", kind="concurrency", limit=2, amount=1)
    first, second = await admit([slots]), await admit([slots])
    assert first.allowed
    assert second.allowed
    assert first.lease
    assert first.lease != second.lease
    third = await admit([slots])
    assert not third.allowed
    assert third.refused == slots
    assert third.retry_after_s == 1
    await release(first)
    assert (await admit([slots])).allowed
    assert not (await admit([slots])).allowed


async def test_expired_leases_free_their_slots(backend: str, settings: Any) -> None:
    settings.RATE_LIMIT_LEASE_TTL_S = 5.0
    slots = Limit(key="k:6:conc", kind="concurrency", limit=1, amount=1)
    held = await admit([slots], now=T0)
    assert held.allowed
    assert not (await admit([slots], now=T0 + 4.9)).allowed
    await renew(held, now=T0 + 4.0)  # extended to T0 + 9
    assert not (await admit([slots], now=T0 + 8.9)).allowed
    assert (await admit([slots], now=T0 + 9.1)).allowed  # the crashed holder's slot came back by itself


async def test_concurrency_refused_releases_nothing_taken_by_the_window(backend: str) -> None:
    rpm = Limit(key="k:7:rpm", kind="requests", limit=1, amount=1)
    slots = Limit(key="k:7:conc", kind="concurrency", limit=5, amount=1)
    assert (await admit([slots, rpm], now=T0)).allowed
    refused = await admit([slots, rpm], now=T0)
    assert refused.refused == rpm
    # the refused admit took no slot: 4 more fit (without the rpm limit)
    assert all([(await admit([slots], now=T0)).allowed for _ in range(4)])
    assert not (await admit([slots], now=T0)).allowed


async def test_budget_admits_while_anything_remains_and_settle_refunds_or_charges(backend: str) -> None:
    """A budget admits a call while spent (reservations included) is below it; the call reserves its estimate,
    so calls at the same time see it: the overshoot is below one call's reservation (when estimates hold)."""
    period_end = T0 + 86_400

    def budget(amount: float) -> Limit:
        return Limit(key="k:8:budget", kind="budget", limit=10.0, amount=amount, window_s=86_400, period_end=period_end)

    first = await admit([budget(6.0)], now=T0)
    assert first.allowed
    assert first.remaining["k:8:budget"] == pytest.approx(4.0)
    second = await admit([budget(5.0)], now=T0 + 1)  # 4 remain: admitted, reserving 5 (spent 11 of 10)
    assert second.allowed
    assert second.remaining["k:8:budget"] == 0
    refused = await admit([budget(0.1)], now=T0 + 1)
    assert not refused.allowed
    assert refused.refused == budget(0.1)
    assert refused.retry_after_s == 86_399  # until the period ends
    await settle(first, {"k:8:budget": 2.5}, now=T0 + 2)  # the call cost less than reserved: 3.5 refunded
    await settle(second, {"k:8:budget": 1.0}, now=T0 + 2)  # 4 refunded: 3.5 spent
    third = await admit([budget(5.0)], now=T0 + 3)
    assert third.allowed
    assert third.remaining["k:8:budget"] == pytest.approx(1.5)
    await settle(third, {"k:8:budget": 7.0}, now=T0 + 4)  # it cost more: 2 charged, 10.5 spent
    assert not (await admit([budget(0.5)], now=T0 + 5)).allowed
    # a new period starts from zero
    nxt = Limit(
        key="k:8:budget", kind="budget", limit=10.0, amount=10.0, window_s=86_400, period_end=period_end + 86_400
    )
    assert (await admit([nxt], now=period_end + 1)).allowed


async def test_settle_refunds_unused_tokens_and_charges_extra_ones(backend: str) -> None:
    def tpm(amount: float) -> Limit:
        return Limit(key="k:9:tpm", kind="tokens", limit=1000, amount=amount)

    slots = Limit(key="k:9:conc", kind="concurrency", limit=1, amount=1)
    estimate = await admit([tpm(800), slots], now=T0)
    assert estimate.allowed
    await settle(estimate, {"k:9:tpm": 200}, now=T0 + 1)  # 600 refunded, the slot released
    after = await admit([tpm(800), slots], now=T0 + 2)
    assert after.allowed
    assert after.remaining["k:9:tpm"] == 0
    await settle(after, {"k:9:tpm": 900}, now=T0 + 3)  # 100 charged: 1100 spent, over the limit
    refused = await admit([tpm(1)], now=T0 + 4)
    assert not refused.allowed
    assert refused.retry_after_s == 57  # second 0's 200 tokens leave the window at T0 + 61
    assert not (await admit([tpm(1)], now=T0 + 60.9)).allowed
    assert (await admit([tpm(1)], now=T0 + 61)).allowed


async def test_a_limit_larger_than_possible_is_refused_for_a_whole_window(backend: str) -> None:
    huge = Limit(key="k:10:tpm", kind="tokens", limit=100, amount=101)
    refused = await admit([huge], now=T0)
    assert not refused.allowed
    assert refused.retry_after_s == 60


async def test_no_limits_is_allowed() -> None:
    assert (await admit([])).allowed


async def test_concurrent_admits_over_two_limits_reserve_only_for_the_allowed_ones(backend: str) -> None:
    rpm = Limit(key="k:11:rpm", kind="requests", limit=100, amount=1)
    slots = Limit(key="k:11:conc", kind="concurrency", limit=10, amount=1)
    decisions = await asyncio.gather(*(admit([rpm, slots], now=T0) for _ in range(30)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    assert {d.refused for d in decisions if not d.allowed} == {slots}
    await asyncio.gather(*(release(d) for d in allowed))
    after = await admit([rpm, slots], now=T0)
    assert after.allowed
    assert after.remaining == {"k:11:rpm": 89, "k:11:conc": 9}  # the 20 refused took no request
