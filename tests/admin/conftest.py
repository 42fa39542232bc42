"""Fixtures of the admin pages' tests: a fast password hasher, the superuser ``root`` and a logged-in client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from accounts.models import User
from tests.factories import UserFactory


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def root(db: None) -> User:
    return UserFactory(username="root", superuser=True)


@pytest.fixture
def admin_for() -> Callable[[User], Client]:
    """A test client logged into the admin as ``user`` (its session cookie, as a browser has it)."""

    def _client(user: User) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return _client
