"""Fixtures for the keys tests: users, JWT-authenticated API clients, public models to scope keys to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from proxy.models import Model
from tests.factories import UserFactory


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    # Factories hash a password per user; the default PBKDF2 cost would dominate these tests' run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


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
        client = APIClient(REMOTE_ADDR="198.51.100.7")
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
        return client

    return _client


@pytest.fixture
def api(client_for: Callable[[User], APIClient], user: User) -> APIClient:
    return client_for(user)


@pytest.fixture
def public_models(db: None) -> list[str]:
    names = ["gpt-4o", "gpt-4o-mini"]
    for name in names:
        Model.objects.create(name=name)
    return names


@pytest.fixture
def run_on_commit(django_capture_on_commit_callbacks: Any) -> Any:
    """Use as ``with run_on_commit():`` so cache invalidations (sent on commit) happen inside a test transaction."""
    return lambda: django_capture_on_commit_callbacks(execute=True)
