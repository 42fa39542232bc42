"""POST /auth/register: who may register, and every way a registration is refused."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError
from rest_framework.test import APIClient

from accounts.models import User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

GOOD_PASSWORD = "a-Long-and-unusual-passphrase-7"


def _register(api: APIClient, **overrides: Any) -> Any:
    body = {"username": "newbie", "email": "newbie@example.com", "password": GOOD_PASSWORD, **overrides}
    return api.post("/auth/register", body, format="json")


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
