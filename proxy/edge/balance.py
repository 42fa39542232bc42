"""Balancing a model's deployments or a route's targets: which member takes the next call.

Three modes (``Model.balancer`` / ``Route.balancer``):

- ``round_robin`` (default): nginx's smooth weighted round-robin. Each pick adds every eligible member's
  weight to its current score, takes the highest score (the first on ties) and subtracts the eligible total
  from it: deterministic, proportional to the weights over any window of ``sum(weights)`` picks, and smooth
  (weights 5, 1, 1 give ``a a b a c a a``, never ``a a a a a b c``);
- ``least_in_flight``: the member with the fewest calls in flight from this worker (ties by round-robin);
- ``ewma``: latency-aware like Kong's ``latency`` and APISIX's ``ewma``: the lowest decaying average of the
  member's call latency times ``in_flight + 1``; members with no sample yet go first (ties by round-robin).

Skipped: weight <= 0, drained, excluded keys (already tried) and members whose breaker refuses
(``proxy.edge.breaker``: open, or half-open with its probes taken). Unhealthy members (the active checks'
verdict, else the stored health) are skipped too unless every remaining one is unhealthy: then they are tried
anyway (Envoy's panic idea) — but an open breaker is never overridden.

State (scores, in-flight counts, latencies) is per process and per ``Balancer``; the catalogs build new ones
when they are rebuilt, which starts them afresh. Everything runs on the event loop: no locks, no I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence, Set
from typing import Generic, Protocol, TypeVar

from proxy.edge.breaker import (
    BreakerPolicy,
    breaker_allow,
    breaker_available,
    breaker_failure,
    breaker_release,
    breaker_success,
    health_unhealthy,
)

ROUND_ROBIN, LEAST_IN_FLIGHT, EWMA = "round_robin", "least_in_flight", "ewma"
MODES = frozenset({ROUND_ROBIN, LEAST_IN_FLIGHT, EWMA})
# EWMA: samples older than this weigh 1/e (APISIX's decay time).
EWMA_DECAY_S = 10.0
# A failed call counts as at least this slow (a refused connection is fast, not a good sign).
FAILURE_LATENCY_S = 1.0


class Member(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def breaker(self) -> BreakerPolicy: ...


M = TypeVar("M", bound=Member)


class Balancer(Generic[M]):
    """Picks among ``members`` (see the module docstring); ``finished`` once per successful pick."""

    __slots__ = ("_current", "_ewma", "_ewma_at", "_in_flight", "_index", "members", "mode")

    def __init__(self, members: Sequence[M], mode: str = ROUND_ROBIN) -> None:
        self.members = tuple(members)
        self.mode = mode if mode in MODES else ROUND_ROBIN
        count = len(self.members)
        self._current = [0] * count
        self._in_flight = [0] * count
        self._ewma = [0.0] * count  # seconds; 0: no sample yet
        self._ewma_at = [0.0] * count
        self._index = {member.key: i for i, member in enumerate(self.members)}

    def pick(self, exclude: Set[str] = frozenset()) -> M | None:
        """The member to call next, counted as in flight; None when none may be called."""
        members = self.members
        if len(members) == 1:  # most models: no choice to make, only whether it may be called
            member = members[0]
            if member.weight <= 0 or member.key in exclude or getattr(member, "drained", False):
                return None
            if not breaker_allow(member.key, member.breaker):
                return None
            self._in_flight[0] += 1
            return member
        healthy: list[int] = []
        unhealthy: list[int] = []
        for i, member in enumerate(members):
            if member.weight <= 0 or member.key in exclude or getattr(member, "drained", False):
                continue
            if not breaker_available(member.key, member.breaker):
                continue
            if health_unhealthy(member.key, getattr(member, "unhealthy", False)):
                unhealthy.append(i)
            else:
                healthy.append(i)
        pool = healthy or unhealthy  # all unhealthy: try them anyway
        if not pool:
            return None
        if len(pool) == 1:
            chosen = pool[0]
        elif self.mode == LEAST_IN_FLIGHT:
            fewest = min(self._in_flight[i] for i in pool)
            chosen = self._round_robin([i for i in pool if self._in_flight[i] == fewest])
        elif self.mode == EWMA:
            chosen = self._round_robin(self._fastest(pool))
        else:
            chosen = self._round_robin(pool)
        member = members[chosen]
        breaker_allow(member.key, member.breaker)  # claims a half-open probe
        self._in_flight[chosen] += 1
        return member

    def _round_robin(self, pool: list[int]) -> int:
        """nginx's smooth weighted round-robin over ``pool`` (indices)."""
        if len(pool) == 1:
            return pool[0]
        current = self._current
        members = self.members
        best = pool[0]
        total = 0
        for i in pool:
            weight = members[i].weight
            current[i] += weight
            total += weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return best

    def _fastest(self, pool: list[int]) -> list[int]:
        unknown = [i for i in pool if self._ewma[i] == 0.0]
        if unknown:
            return unknown
        scores = {i: self._ewma[i] * (self._in_flight[i] + 1) for i in pool}
        best = min(scores.values())
        return [i for i in pool if math.isclose(scores[i], best, rel_tol=1e-9)]

    def finished(self, member: M, *, ok: bool | None, elapsed_s: float) -> None:
        """The call to ``member`` (picked here) ended: ``ok`` False for a 5xx, a connect error or a timeout;
        None when it ended without a verdict (the client left first: frees a half-open probe, counts nothing)."""
        i = self._index.get(member.key)
        if i is not None:
            if self._in_flight[i] > 0:
                self._in_flight[i] -= 1
            if ok is not None and self.mode == EWMA:
                self._observe(i, elapsed_s if ok else max(elapsed_s, 2 * self._ewma[i], FAILURE_LATENCY_S))
        if ok is None:
            breaker_release(member.key)
        elif ok:
            breaker_success(member.key, member.breaker)
        else:
            breaker_failure(member.key, member.breaker)

    def _observe(self, i: int, sample: float) -> None:
        now = time.monotonic()
        sample = max(sample, 1e-6)
        if self._ewma[i] == 0.0:
            self._ewma[i] = sample
        else:
            weight = math.exp(-max(now - self._ewma_at[i], 0.0) / EWMA_DECAY_S)
            self._ewma[i] = self._ewma[i] * weight + sample * (1 - weight)
        self._ewma_at[i] = now

    def in_flight(self, member: M) -> int:
        """Calls to ``member`` picked here and not finished yet."""
        i = self._index.get(member.key)
        return 0 if i is None else self._in_flight[i]
