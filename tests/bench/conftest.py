"""Micro-benchmarks of the proxy hot path's pieces (pytest-benchmark).

Every test here is marked ``bench``. ``make test`` runs them with ``--benchmark-disable`` (each benchmarked
function runs once, as a plain test that checks its result); ``make bench-micro`` times them. Nothing here
asserts a duration: timings are read, never enforced.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any


def run_without_suspending(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` to completion without an event loop; fails if it ever awaits something pending.

    The hot path's cache hits are meant to answer without suspending (no I/O, no thread hop): driving the
    coroutine by hand both measures it without event-loop overhead and proves that property.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError("the coroutine suspended: the cache hit waited for something")
