"""POST /auth/register: who may register, every way a registration is refused, throttling, enumeration safety."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from django.db import IntegrityError
from rest_framework.test import APIClient

from accounts.models import User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

GOOD_PASSWORD = "a-Long-and-unusual-passphrase-7"


def _register(api: APIClient, ip: str = "127.0.0.1", **overrides: Any) -> Any:
    body = {"username": "newbie", "email": "newbie@example.com", "password": GOOD_PASSWORD, **overrides}
    return api.post("/auth/register", body, format="json", REMOTE_ADDR=ip)


def test_registration_creates_an_active_ordinary_user_with_a_hashed_password(api: APIClient) -> None:
    response = _register(api)

    assert response.status_code == 201
    assert set(response.json()) == {"id", "username", "email", "display_name", "is_staff", "date_joined"}
    user = User.objects.get(username="newbie")
    assert user.is_active
    assert not user.is_staff
    assert not user.is_superuser
    assert user.password != GOOD_PASSWORD
    assert user.check_password(GOOD_PASSWORD)
    assert user.display_name == ""


def test_the_email_domain_is_normalized_to_lower_case(api: APIClient) -> None:
    response = _register(api, email="Newbie@EXAMPLE.com")

    assert response.status_code == 201
    assert response.json()["email"] == "Newbie@example.com"


@pytest.mark.parametrize("username", ["alice", "ALICE", "Alice"])
def test_a_taken_username_in_any_case_is_a_field_error(api: APIClient, username: str) -> None:
    UserFactory(username="alice")

    response = _register(api, username=username)

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert body["fields"] == {"username": ["A user with that username already exists."]}
    assert User.objects.filter(username__iexact="alice").count() == 1


def test_a_taken_email_in_any_case_is_a_field_error(api: APIClient) -> None:
    UserFactory(email="taken@example.com")

    response = _register(api, email="TAKEN@example.com")

    assert response.status_code == 400
    assert response.json()["fields"] == {"email": ["A user with that email address already exists."]}


def test_the_database_refuses_case_variants_that_skip_the_registration_checks() -> None:
    UserFactory(username="bob", email="bob@example.com")

    with pytest.raises(IntegrityError):
        UserFactory(username="BOB", email="other@example.com")


@pytest.mark.parametrize(
    ("password", "message_part"),
    [
        ("short1!", "too short"),
        ("password123", "too common"),
        ("83749201948372", "entirely numeric"),
        ("newbie2024", "too similar"),
    ],
)
def test_weak_passwords_are_refused_by_djangos_validators(api: APIClient, password: str, message_part: str) -> None:
    response = _register(api, password=password)

    assert response.status_code == 400
    messages = response.json()["fields"]["password"]
    assert any(message_part in message for message in messages), messages
    assert not User.objects.filter(username="newbie").exists()


def test_missing_fields_are_each_reported(api: APIClient) -> None:
    response = api.post("/auth/register", {}, format="json")

    assert response.status_code == 400
    body = response.json()
    assert body["detail"] == "Invalid input."
    assert set(body["fields"]) == {"username", "email", "password"}
    assert body["fields"]["username"] == ["This field is required."]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"username": "has space"}, "username"),
        ({"username": "x" * 151}, "username"),
        ({"display_name": "d" * 151}, "display_name"),
    ],
)
def test_malformed_fields_are_field_errors(api: APIClient, overrides: dict[str, str], field: str) -> None:
    response = _register(api, **overrides)

    assert response.status_code == 400
    assert field in response.json()["fields"]


def test_registration_needs_no_credentials_and_ignores_a_bad_bearer_token(api: APIClient) -> None:
    response = api.post(
        "/auth/register",
        {"username": "newbie", "email": "newbie@example.com", "password": GOOD_PASSWORD},
        format="json",
        HTTP_AUTHORIZATION="Bearer not-a-token",
    )

    assert response.status_code == 201


# --- throttling per client IP ---------------------------------------------------------------------------


def test_registrations_from_one_ip_are_throttled_with_retry_after(api: APIClient, settings: Any) -> None:
    settings.REGISTRATION_THROTTLE_RATE = 3
    settings.REGISTRATION_THROTTLE_WINDOW_S = 600
    # Every attempt counts, refused ones too.
    assert _register(api, username="u1", email="u1@example.com", ip="192.0.2.1").status_code == 201
    assert _register(api, username="u2", password="short", ip="192.0.2.1").status_code == 400
    assert _register(api, username="u3", email="u3@example.com", ip="192.0.2.1").status_code == 201

    throttled = _register(api, username="u4", email="u4@example.com", ip="192.0.2.1")

    assert throttled.status_code == 429
    assert throttled.json() == {
        "detail": f"Too many registrations from this address. Try again in {throttled['Retry-After']} seconds.",
        "code": "throttled",
    }
    assert 0 < int(throttled["Retry-After"]) <= 600
    assert not User.objects.filter(username="u4").exists()
    assert _register(api, username="u4", email="u4@example.com", ip="192.0.2.2").status_code == 201


def test_registration_still_works_without_the_cache_and_says_so_in_the_log(
    api: APIClient, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
        }
    }

    assert _register(api).status_code == 201

    warnings = [r.getMessage() for r in caplog.records if r.name == "accounts.throttling"]
    assert warnings == ["registration throttle skipped: cache unavailable"]


def test_a_registration_without_a_client_address_is_not_throttled(settings: Any) -> None:
    from accounts.throttling import registration_attempt_reserve

    settings.REGISTRATION_THROTTLE_RATE = 1
    for _ in range(3):
        registration_attempt_reserve(ip=None)


# --- REGISTRATION_ENUMERATION_SAFE ----------------------------------------------------------------------


@pytest.fixture
def enumeration_safe(settings: Any) -> None:
    settings.REGISTRATION_ENUMERATION_SAFE = True


@pytest.mark.usefixtures("enumeration_safe")
@pytest.mark.parametrize(
    "overrides",
    [
        {"username": "ALICE"},  # taken username, in another case
        {"email": "Alice@EXAMPLE.com"},  # taken email
        {"username": "alice", "email": "alice@example.com"},  # both
    ],
)
def test_enumeration_safe_a_taken_username_or_email_answers_like_a_new_account(
    api: APIClient, overrides: dict[str, str]
) -> None:
    UserFactory(username="alice", email="alice@example.com")
    body = {"username": "newbie", "email": "Newbie@EXAMPLE.com", **overrides}
    fresh = {"username": "fresh", "email": "Fresh@EXAMPLE.com"}

    taken = _register(api, **body)
    new = _register(api, **fresh)

    assert taken.status_code == new.status_code == 201
    assert set(taken.json()) == set(new.json()) == {"username", "email", "display_name"}
    # Normalized the same way, so the echo tells nothing either.
    assert taken.json()["email"] == body["email"].rsplit("@")[0] + "@example.com"
    assert new.json() == {"username": "fresh", "email": "Fresh@example.com", "display_name": ""}
    assert User.objects.count() == 2
    assert User.objects.filter(username="fresh").exists()


@pytest.mark.usefixtures("enumeration_safe")
def test_enumeration_safe_other_field_errors_are_still_reported(api: APIClient) -> None:
    UserFactory(username="alice")

    response = _register(api, username="alice", password="short1!")

    assert response.status_code == 400
    assert set(response.json()["fields"]) == {"password"}


@pytest.mark.usefixtures("enumeration_safe")
def test_enumeration_safe_a_lost_race_answers_like_a_new_account(api: APIClient) -> None:
    UserFactory(username="alice", email="alice@example.com")

    # As if the other registration committed between the duplicate check and the insert.
    with mock.patch("accounts.services._duplicate_errors", return_value={}):
        response = _register(api, username="alice", email="alice@example.com")

    assert response.status_code == 201
    assert response.json() == {"username": "alice", "email": "alice@example.com", "display_name": ""}
    assert User.objects.count() == 1


def test_without_enumeration_safety_a_lost_race_is_a_field_error(api: APIClient) -> None:
    UserFactory(username="alice", email="alice@example.com")

    with mock.patch("accounts.services._duplicate_errors", side_effect=[{}, {}]):
        response = _register(api, username="alice", email="other@example.com")

    assert response.status_code == 400
    assert response.json()["fields"] == {"username": ["A user with that username already exists."]}
