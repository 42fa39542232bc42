"""Circuit breakers per route target and per model deployment (skeleton: replaced by the breaker work)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a member's breaker opens and for how long (an upstream's or a route's breaker settings)."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0
    half_open_requests: int = 1


def breaker_allow(key: str, policy: BreakerPolicy) -> bool:
    """Whether ``key`` may be called now (no I/O)."""
    return True
