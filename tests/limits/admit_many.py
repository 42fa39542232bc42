"""Run by test_redis.py in separate OS processes: admit K times (concurrently) against one Redis-backed limit
and print how many were allowed. Usage: python -m tests.limits.admit_many <key> <limit> <k>."""

from __future__ import annotations

import asyncio
import sys

import django


async def _main(key: str, limit: int, k: int) -> int:
    from proxy.edge.limits import Limit, admit, limiter

    rpm = Limit(key=key, kind="requests", limit=limit, amount=1)
    decisions = await asyncio.gather(*(admit([rpm]) for _ in range(k)))
    closing = getattr(limiter(), "close", None)
    if closing is not None:
        await closing()
    if any(d.unavailable for d in decisions):
        return -1
    return sum(d.allowed for d in decisions)


if __name__ == "__main__":
    django.setup()
    sys.stdout.write(f"{asyncio.run(_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))}\n")
