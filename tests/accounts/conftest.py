"""Fixtures for the accounts tests: an API client, a user, and a cheap password hasher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from accounts.models import User
from tests.factories import DEFAULT_PASSWORD, UserFactory


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    # PBKDF2 at Django's default cost makes every login take ~0.5 s; what is tested here
    # does not depend on the hasher.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def api() -> APIClient:
    return APIClient()


@pytest.fixture
def user(db: None) -> User:
    return UserFactory(username="alice", email="alice@example.com")


@pytest.fixture
def login(api: APIClient) -> Callable[..., Any]:
    """POST /auth/login as ``username`` (from ``ip``), returning the response."""

    def _login(username: str, password: str = DEFAULT_PASSWORD, *, ip: str = "127.0.0.1") -> Any:
        return api.post("/auth/login", {"username": username, "password": password}, format="json", REMOTE_ADDR=ip)

    return _login
