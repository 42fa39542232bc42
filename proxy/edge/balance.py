"""Balancing a model's deployments or a route's targets (skeleton: replaced by the balancer work)."""

from __future__ import annotations

from collections.abc import Sequence, Set
from typing import Generic, Protocol, TypeVar

from proxy.edge.breaker import BreakerPolicy, breaker_allow


class Member(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def breaker(self) -> BreakerPolicy: ...


M = TypeVar("M", bound=Member)


class Balancer(Generic[M]):
    """Smooth weighted round-robin over ``members`` (nginx's algorithm)."""

    def __init__(self, members: Sequence[M], mode: str = "round_robin") -> None:
        self.members = tuple(members)
        self.mode = mode
        self._current = [0] * len(self.members)

    def pick(self, exclude: Set[str] = frozenset()) -> M | None:
        best = -1
        total = 0
        for i, member in enumerate(self.members):
            if member.weight <= 0 or member.key in exclude or not breaker_allow(member.key, member.breaker):
                continue
            self._current[i] += member.weight
            total += member.weight
            if best < 0 or self._current[i] > self._current[best]:
                best = i
        if best < 0:
            return None
        self._current[best] -= total
        return self.members[best]

    def finished(self, member: M, *, ok: bool, elapsed_s: float) -> None:
        """Report the end of a call to ``member`` picked here."""
