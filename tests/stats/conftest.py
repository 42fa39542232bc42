"""Fixtures for the statistics tests: ledger rows made the way the consumer writes them, users, API clients."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from gateway_stats.ledger import ledger_write, usage_row
from gateway_stats.models import UsageRecord
from gateway_stats.usage import UsageEvent
from tests.factories import UserFactory

# A fixed, recent "now" would be frozen by retention: the tests use the real clock, on whole hours before it.
MODELS = ("gpt-4o", "gpt-4o-mini", "embed-small")
UPSTREAMS = ("openai-a", "openai-b")
STATUSES = (200, 200, 200, 200, 200, 201, 400, 401, 429, 499, 500, 502, 504)


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def hour_ago(hours: float = 1.0) -> datetime:
    """A whole minute ``hours`` before now (UTC)."""
    return (datetime.now(UTC) - timedelta(hours=hours)).replace(second=0, microsecond=0)


def call(
    *,
    started_at: datetime,
    key_id: int | None = 1,
    user_id: int | None = 1,
    model: str = "gpt-4o",
    upstream: str = "openai-a",
    route: str = "",
    status: int = 200,
    error_code: str = "",
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
    latency_ms: float = 120.0,
    request_bytes: int = 300,
    response_bytes: int = 900,
    request_id: str | None = None,
    ingested_at: datetime | None = None,
) -> UsageRecord:
    """One ledger row, written by ``ledger_write`` as the consumer writes it (its ``ingested_at`` is now
    unless given)."""
    event_id = uuid.uuid4().hex
    event = UsageEvent(
        request_id=request_id or f"req-{event_id[:12]}",
        endpoint="/v1/chat/completions",
        status=status,
        key_id=key_id,
        key_prefix=f"sk-{key_id:08d}" if key_id else "",
        user_id=user_id,
        model=model,
        upstream=upstream,
        upstream_model=model,
        route=route,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        started_at=started_at.timestamp(),
        error_code=error_code,
        request_bytes=request_bytes,
        response_bytes=response_bytes,
        input_price_per_1k=Decimal("0.0025"),
        output_price_per_1k=Decimal("0.01"),
        event_id=event_id,
    )
    ledger_write([usage_row(event)])
    if ingested_at is not None:
        UsageRecord.objects.filter(event_id=event_id).update(ingested_at=ingested_at)
    return UsageRecord.objects.get(event_id=event_id)


def random_calls(
    count: int, *, start: datetime, span: timedelta, seed: int = 7, users: tuple[int, ...] = (1, 2)
) -> list[UsageRecord]:
    """``count`` calls spread over ``[start, start + span)``: several keys, users, models, upstreams, routes,
    statuses and latencies from 0.3 ms to 30 s."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        user_id = rng.choice(users)
        status = rng.choice(STATUSES)
        records.append(
            call(
                started_at=start + timedelta(seconds=rng.uniform(0, span.total_seconds())),
                user_id=user_id,
                key_id=user_id * 10 + rng.randint(0, 1),
                model=rng.choice(MODELS),
                upstream=rng.choice(UPSTREAMS),
                route=rng.choice(("", "search")),
                status=status,
                error_code="" if status < 400 else f"e{status}",
                prompt_tokens=rng.randint(0, 4000),
                completion_tokens=rng.randint(0, 2000),
                latency_ms=10 ** rng.uniform(-0.5, 4.5),
                request_bytes=rng.randint(100, 10_000),
                response_bytes=rng.randint(100, 100_000),
            )
        )
    return records


@pytest.fixture
def user(db: None) -> User:
    return UserFactory(username="alice")


@pytest.fixture
def other_user(db: None) -> User:
    return UserFactory(username="bob")


@pytest.fixture
def staff(db: None) -> User:
    return UserFactory(username="root", superuser=True)


@pytest.fixture
def client_for() -> Callable[[User], APIClient]:
    """An API client sending a JWT access token for ``user``."""

    def _client(user: User) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
        return client

    return _client
