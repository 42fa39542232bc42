"""Fixtures of the limiter engine's tests: each backend behind the same API, with its state forgotten."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.conf import settings as django_settings

from proxy.edge import limits


@pytest.fixture(params=["in_process", "redis"])
async def backend(request: pytest.FixtureRequest, settings: Any) -> AsyncIterator[str]:
    """Runs a test against the in-process limiter and against Redis (skipped without REDIS_URL)."""
    if request.param == "redis" and not django_settings.REDIS_URL:
        pytest.skip("needs REDIS_URL")
    if request.param == "in_process":
        settings.REDIS_URL = ""
    limits.limits_forget()
    yield request.param
    chosen = limits.limiter()
    if isinstance(chosen, limits.RedisLimiter):
        await chosen.close()
    limits.limits_forget()
