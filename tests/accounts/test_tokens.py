"""JWT handling: /auth/me, /auth/refresh and /auth/logout with good, bad and missing tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from accounts.models import User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

BEARER_CHALLENGE = 'Bearer realm="api"'


@pytest.fixture
def tokens(login: Callable[..., Any], user: User) -> dict[str, str]:
    response = login("alice")
    assert response.status_code == 200
    return dict(response.json())


def _bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.mark.parametrize(("method", "path"), [("get", "/auth/me"), ("post", "/auth/logout")])
def test_without_credentials_the_answer_is_401_with_a_bearer_challenge(api: APIClient, method: str, path: str) -> None:
    response = getattr(api, method)(path, format="json")

    assert response.status_code == 401
    assert response.json() == {
        "detail": "Authentication credentials were not provided.",
        "code": "not_authenticated",
    }
    assert response["WWW-Authenticate"] == BEARER_CHALLENGE


def test_a_bad_access_token_is_401_token_not_valid(api: APIClient) -> None:
    response = api.get("/auth/me", **_bearer("not.a.jwt"))

    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "token_not_valid"
    assert body["detail"] == "Given token not valid for any token type"
    assert response["WWW-Authenticate"] == BEARER_CHALLENGE


def test_a_refresh_token_is_not_accepted_as_an_access_token(api: APIClient, tokens: dict[str, str]) -> None:
    assert api.get("/auth/me", **_bearer(tokens["refresh"])).status_code == 401


def test_me_shows_the_current_user(api: APIClient, tokens: dict[str, str], user: User) -> None:
    response = api.get("/auth/me", **_bearer(tokens["access"]))

    assert response.status_code == 200
    assert response.json() == {
        "id": user.pk,
        "username": "alice",
        "email": "alice@example.com",
        "display_name": "Alice",
        "is_staff": False,
        "date_joined": user.date_joined.isoformat().replace("+00:00", "Z"),
    }


def test_me_also_works_with_a_session_for_the_browsable_api(api: APIClient, user: User) -> None:
    api.force_login(user)

    response = api.get("/auth/me", HTTP_ACCEPT="text/html")

    assert response.status_code == 200
    assert b"alice@example.com" in response.content


def test_access_tokens_of_a_deactivated_user_stop_working(api: APIClient, tokens: dict[str, str], user: User) -> None:
    User.objects.filter(pk=user.pk).update(is_active=False)

    assert api.get("/auth/me", **_bearer(tokens["access"])).status_code == 401
    assert api.post("/auth/refresh", {"refresh": tokens["refresh"]}, format="json").status_code == 401


@pytest.mark.parametrize("refresh", ["garbage", ""])
def test_refresh_with_a_bad_token_is_401_and_without_one_400(api: APIClient, refresh: str) -> None:
    response = api.post("/auth/refresh", {"refresh": refresh} if refresh else {}, format="json")

    if refresh:
        assert response.status_code == 401
        assert response.json() == {"detail": "Token is invalid", "code": "token_not_valid"}
    else:
        assert response.status_code == 400
        assert response.json()["fields"] == {"refresh": ["This field is required."]}


def test_an_access_token_cannot_be_used_to_refresh(api: APIClient, tokens: dict[str, str]) -> None:
    response = api.post("/auth/refresh", {"refresh": tokens["access"]}, format="json")

    assert response.status_code == 401
    assert response.json()["code"] == "token_not_valid"


def test_logout_needs_a_bearer_token_not_just_a_session(api: APIClient, tokens: dict[str, str], user: User) -> None:
    api.force_login(user)

    response = api.post("/auth/logout", {"refresh": tokens["refresh"]}, format="json")

    assert response.status_code == 401
    assert api.post("/auth/refresh", {"refresh": tokens["refresh"]}, format="json").status_code == 200


def test_logout_refuses_a_bad_or_missing_refresh_token(api: APIClient, tokens: dict[str, str]) -> None:
    bad = api.post("/auth/logout", {"refresh": "garbage"}, format="json", **_bearer(tokens["access"]))
    missing = api.post("/auth/logout", {}, format="json", **_bearer(tokens["access"]))

    assert bad.status_code == 400
    assert bad.json()["fields"] == {"refresh": ["Token is invalid"]}
    assert missing.status_code == 400
    assert missing.json()["fields"] == {"refresh": ["This field is required."]}


def test_logout_refuses_someone_elses_refresh_token(api: APIClient, tokens: dict[str, str], login: Any) -> None:
    UserFactory(username="mallory")
    mallory = login("mallory").json()

    response = api.post("/auth/logout", {"refresh": tokens["refresh"]}, format="json", **_bearer(mallory["access"]))

    assert response.status_code == 400
    assert response.json()["fields"] == {"refresh": ["This token does not belong to the authenticated user."]}
    # Alice's token still works.
    assert api.post("/auth/refresh", {"refresh": tokens["refresh"]}, format="json").status_code == 200


def test_logging_out_twice_with_the_same_token_is_refused_the_second_time(
    api: APIClient, tokens: dict[str, str]
) -> None:
    first = api.post("/auth/logout", {"refresh": tokens["refresh"]}, format="json", **_bearer(tokens["access"]))
    second = api.post("/auth/logout", {"refresh": tokens["refresh"]}, format="json", **_bearer(tokens["access"]))

    assert first.status_code == 205
    assert second.status_code == 400
    assert second.json()["fields"] == {"refresh": ["Token is blacklisted"]}
