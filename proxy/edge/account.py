"""Accounting: the usage event of a request, handed off the request path once its answer is done."""

from __future__ import annotations

import time
from typing import Any

from gateway_stats.usage import UsageEvent, usage_event_emit


def usage_note(event: UsageEvent, usage: Any) -> None:
    """Note the tokens of an upstream's ``usage`` object (anything else is ignored)."""
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        event.prompt_tokens = prompt if isinstance(prompt, int) else 0
        event.completion_tokens = completion if isinstance(completion, int) else 0


def account(event: UsageEvent, started: float) -> None:
    """Hand the finished request's usage off (an in-process queue: no I/O here)."""
    event.latency_ms = (time.perf_counter() - started) * 1000
    usage_event_emit(event)
