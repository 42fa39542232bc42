"""Fixtures of the limits' data side: users, staff, API and admin clients, ledger rows."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from gateway_stats.models import UsageRecord
from tests.factories import UserFactory

_event_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    # Factories hash a password per user; the default PBKDF2 cost would dominate these tests' run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def user(db: None) -> User:
    return UserFactory(username="alice")


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


@pytest.fixture
def admin_client_(staff: User) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def run_on_commit(django_capture_on_commit_callbacks: Any) -> Any:
    """Use as ``with run_on_commit():`` so cache invalidations (sent on commit) happen inside a test transaction."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


def usage(*, key: Any, started_at: datetime, total_tokens: int, cost: str, **fields: Any) -> UsageRecord:
    """A ledger row of one call of ``key`` (its owner as the user)."""
    number = next(_event_ids)
    values: dict[str, Any] = {
        "event_id": f"lim{number:026x}",
        "request_id": f"req-lim-{number}",
        "started_at": started_at,
        "key": key,
        "key_prefix": key.prefix,
        "user_id": key.owner_id,
        "endpoint": "/v1/chat/completions",
        "status": 200,
        "model": "gpt-4o",
        "prompt_tokens": total_tokens,
        "completion_tokens": 0,
        "total_tokens": total_tokens,
        "cost": Decimal(cost),
    }
    values.update(fields)
    return UsageRecord.objects.create(**values)
