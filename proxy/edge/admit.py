"""Admission: may this request go ahead now? Rate limits and budgets will answer here (a 429 ``ProxyError``).

Called for every authenticated request, before the body is read; synchronous while it holds no state
that needs I/O, so it costs the hot path one plain call.
"""

from __future__ import annotations

from gateway_stats.usage import UsageEvent
from keys.verification import KeyPolicy


def admit(policy: KeyPolicy, event: UsageEvent) -> None:
    """Let the request through (no limits exist yet)."""
