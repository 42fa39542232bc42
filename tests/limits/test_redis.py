"""The Redis backend of the limiter: exact across OS processes, every key with a TTL, the NOSCRIPT fallback,
and an unreachable Redis answered at once as ``unavailable`` behind the local breaker (never an exception)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio
from django.conf import settings as django_settings

from proxy.edge import limits
from proxy.edge.limits import Limit, RedisLimiter
from tests.tcp_forwarder import TcpForwarder

pytestmark = pytest.mark.skipif(not django_settings.REDIS_URL, reason="needs REDIS_URL")

ROOT = Path(__file__).resolve().parents[2]
CLOSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
async def raw_redis() -> AsyncIterator[Any]:
    client = redis.asyncio.Redis.from_url(django_settings.REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def _forget() -> AsyncIterator[None]:
    limits.limits_forget()
    yield
    chosen = limits.limiter()
    if isinstance(chosen, RedisLimiter):
        await chosen.close()
    limits.limits_forget()


def test_two_os_processes_sharing_redis_allow_exactly_the_limit_in_total() -> None:
    env = {**os.environ, "CACHE_KEY_PREFIX": django_settings.CACHE_KEY_PREFIX, "APP_ENV": "test"}
    env["REDIS_URL"] = django_settings.REDIS_URL
    env.setdefault("DJANGO_SETTINGS_MODULE", "apiforge.settings")
    command = [sys.executable, "-m", "tests.limits.admit_many", "k:cross:rpm", "40", "60"]
    runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=20)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    allowed = [int(out.strip()) for out in outputs]
    assert min(allowed) >= 0  # neither process found Redis unavailable
    assert sum(allowed) == 40


@pytest.mark.usefixtures("_forget")
async def test_every_key_the_limiter_writes_has_a_ttl(raw_redis: Any) -> None:
    period_end = time.time() + 3600
    decision = await limits.admit(
        [
            Limit(key="k:ttl:rpm", kind="requests", limit=10),
            Limit(key="k:ttl:tpm", kind="tokens", limit=1000, amount=10),
            Limit(key="k:ttl:conc", kind="concurrency", limit=2),
            Limit(key="k:ttl:budget", kind="budget", limit=5.0, amount=1.0, window_s=86_400, period_end=period_end),
        ]
    )
    assert decision.allowed
    keys = [key async for key in raw_redis.scan_iter(match=f"{django_settings.CACHE_KEY_PREFIX}:lim:*")]
    assert len(keys) == 4
    for key in keys:
        assert 0 < await raw_redis.ttl(key) <= 3660


@pytest.mark.usefixtures("_forget")
async def test_admit_works_after_redis_forgot_the_script(raw_redis: Any) -> None:
    rpm = Limit(key="k:noscript:rpm", kind="requests", limit=2)
    assert (await limits.admit([rpm])).allowed
    await raw_redis.script_flush()
    second = await limits.admit([rpm])  # EVALSHA answers NOSCRIPT: the script is sent again
    assert second.allowed
    assert not second.unavailable
    assert not (await limits.admit([rpm])).allowed


@pytest.mark.usefixtures("_forget")
async def test_settles_of_one_moment_go_as_one_batch_and_survive_a_forgotten_script(raw_redis: Any) -> None:
    tpm = Limit(key="k:batch:tpm", kind="tokens", limit=100, amount=40)
    slot = Limit(key="k:batch:conc", kind="concurrency", limit=3)
    admitted = [await limits.admit([tpm, slot]) for _ in range(2)]
    assert all(decision.allowed for decision in admitted)
    await raw_redis.script_flush()  # the settle script is gone too: the batch loads it and sends it again
    await asyncio.gather(*(limits.settle(decision, {"k:batch:tpm": 5}) for decision in admitted))
    after = await limits.admit([tpm, slot])
    assert after.allowed
    assert after.remaining["k:batch:tpm"] == 100 - 5 - 5 - 40, "both calls settled to their real 5 tokens"
    assert after.remaining["k:batch:conc"] == 2, "both slots released"


async def test_unreachable_redis_answers_unavailable_at_once_and_warns_once(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.RATE_LIMIT_FAIL_OPEN = True
    closed = RedisLimiter(CLOSED)
    rpm = Limit(key="k:down:rpm", kind="requests", limit=1)
    caplog.set_level(logging.WARNING, logger="proxy.edge.limits")
    started = time.monotonic()
    decisions = [await closed.admit([rpm], time.time()) for _ in range(5)]
    elapsed = time.monotonic() - started
    assert all(d.unavailable and not d.allowed for d in decisions)
    assert all(d.proceed and d.fail_open for d in decisions)  # RATE_LIMIT_FAIL_OPEN decides
    settings.RATE_LIMIT_FAIL_OPEN = False
    assert not decisions[0].proceed
    assert elapsed < 2.0  # a generous bound: the client does not retry with backoff
    warnings = [r for r in caplog.records if r.name == "proxy.edge.limits"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    await limits.settle(decisions[0], {})  # nothing to settle, and no exception
    await closed.close()


async def test_after_a_failure_redis_is_not_asked_again_until_the_retry_interval(settings: Any) -> None:
    settings.RATE_LIMIT_REDIS_RETRY_S = 1.0
    target = urlsplit(django_settings.REDIS_URL)
    forwarder = TcpForwarder(target.port or 6379).start()
    forwarder.cut()  # Redis "down": connections to the forwarder's port are refused
    _wait_until_refused(forwarder.port)
    via = RedisLimiter(f"redis://127.0.0.1:{forwarder.port}{target.path}")
    rpm = Limit(key="k:breaker:rpm", kind="requests", limit=100)
    try:
        assert (await via.admit([rpm], time.time())).unavailable
        forwarder.restore()  # Redis is reachable again, but the breaker does not ask it yet
        assert (await via.admit([rpm], time.time())).unavailable
        deadline = time.monotonic() + 5
        back = await via.admit([rpm], time.time())
        while back.unavailable and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            back = await via.admit([rpm], time.time())
        assert back.allowed  # exact again as soon as Redis answers
        assert back.remaining["k:breaker:rpm"] == 99
    finally:
        forwarder.cut()
        await via.close()


def _wait_until_refused(port: int) -> None:
    """The forwarder's accept thread may hold its listener a moment after ``cut()``: wait until it is gone."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.02)
    raise AssertionError("the forwarder still accepts connections")
