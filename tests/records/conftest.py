"""Fixtures for the request-log and audit tests: users, API and admin clients, ledger rows."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from gateway_stats.models import UsageRecord
from tests.factories import UserFactory

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
_event_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    # Factories and logins hash passwords; the default PBKDF2 cost would dominate these tests' run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def alice(db: None) -> User:
    return UserFactory(username="alice")


@pytest.fixture
def bob(db: None) -> User:
    return UserFactory(username="bob")


@pytest.fixture
def root(db: None) -> User:
    return UserFactory(username="root", superuser=True)


@pytest.fixture
def plain_staff(db: None) -> User:
    """``is_staff`` without any permission: an ordinary user, as everywhere in the API."""
    return UserFactory(username="plain-staff", staff=True)


@pytest.fixture
def log_reader(db: None) -> User:
    """Staff holding exactly the read permissions of this app (not a superuser)."""
    user = UserFactory(username="log-reader", staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="gateway_stats", codename__in=["view_usagerecord", "view_auditevent"]
        )
    )
    return user


@pytest.fixture
def api_for() -> Callable[[User | None], APIClient]:
    """An API client sending a JWT access token for ``user`` (none for ``None``)."""

    def _client(user: User | None) -> APIClient:
        client = APIClient(REMOTE_ADDR="198.51.100.7")
        if user is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
        return client

    return _client


@pytest.fixture
def admin_for() -> Callable[[User], Client]:
    def _client(user: User) -> Client:
        client = Client(REMOTE_ADDR="192.0.2.50")
        client.force_login(user)
        return client

    return _client


def usage(**fields: Any) -> UsageRecord:
    """A ledger row: a successful, unstreamed call at ``T0`` unless told otherwise."""
    number = next(_event_ids)
    values: dict[str, Any] = {
        "event_id": f"ev{number:026x}",
        "request_id": f"req-{number}",
        "started_at": T0,
        "endpoint": "/v1/chat/completions",
        "method": "POST",
        "status": 200,
        "model": "gpt-4o",
        "upstream": "openai",
        "upstream_model": "gpt-4o-2024-08-06",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "input_price_per_1k": Decimal("0.0025"),
        "output_price_per_1k": Decimal("0.01"),
        "cost": Decimal("0.000075"),
        "latency_ms": 120.5,
        "request_bytes": 300,
        "response_bytes": 900,
        "client_ip": "203.0.113.9",
    }
    values.update(fields)
    return UsageRecord.objects.create(**values)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)
