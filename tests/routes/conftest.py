"""Fixtures of the route registry tests: callers (staff with the route permissions, a plain user, a superuser),
API clients for a JWT or an API key, and a body to register."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from tests.factories import ApiKeyFactory, UserFactory
from tests.live_server import live_gateway, live_server_factory

__all__ = ["live_gateway", "live_server_factory"]

ALLOWED_TARGET = "http://orders-1.svc.internal:8080"


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    # Factories hash a password per user; the default PBKDF2 cost would dominate these tests' run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff(db: None) -> User:
    """A staff member holding every route permission (not a superuser)."""
    member = UserFactory(staff=True)
    member.user_permissions.set(
        Permission.objects.filter(content_type__app_label="proxy", codename__regex=r"_(route|routetarget)$")
    )
    return member


@pytest.fixture
def user(db: None) -> User:
    return UserFactory()


def jwt_client(user: User, **defaults: Any) -> APIClient:
    client = APIClient(**defaults)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
    return client


def key_client(secret: str, *, header: str = "bearer", **defaults: Any) -> APIClient:
    """A client presenting an API key: as ``Authorization: Bearer`` (default), ``x-api-key`` or ``api-key``."""
    client = APIClient(**defaults)
    if header == "bearer":
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    elif header == "x-api-key":
        client.credentials(HTTP_X_API_KEY=secret)
    else:
        client.credentials(HTTP_API_KEY=secret)
    return client


@pytest.fixture
def staff_client(staff: User) -> APIClient:
    return jwt_client(staff, REMOTE_ADDR="198.51.100.7")


@pytest.fixture
def user_client(user: User) -> APIClient:
    return jwt_client(user)


@pytest.fixture
def service_key(user: User) -> Callable[..., Any]:
    """Make a key of ``user`` naming the given routes (written directly: a key may name a route not made yet)."""

    def make(*routes: str, **fields: Any) -> Any:
        return ApiKeyFactory(owner=user, allowed_routes=list(routes), **fields)

    return make


def route_body(name: str = "orders", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "path": f"/{name}",
        "targets": [{"url": ALLOWED_TARGET, "weight": 1}],
    }
    body.update(overrides)
    return body
