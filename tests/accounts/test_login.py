"""POST /auth/login: credentials, error answers, throttling per username and per IP, logging."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.models import User
from tests.factories import DEFAULT_PASSWORD, UserFactory

pytestmark = pytest.mark.django_db

Login = Callable[..., Any]


@pytest.fixture(autouse=True)
def _three_failures_per_minute(settings: Any) -> None:
    settings.LOGIN_THROTTLE_FAILURES = 3
    settings.LOGIN_THROTTLE_IP_FAILURES = 6
    settings.LOGIN_THROTTLE_WINDOW_S = 60


def test_right_credentials_give_a_token_pair_and_record_the_login(login: Login, user: User) -> None:
    assert user.last_login is None

    response = login("alice")

    assert response.status_code == 200
    assert set(response.json()) == {"access", "refresh"}
    user.refresh_from_db()
    assert user.last_login is not None


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong-password"), ("nobody", DEFAULT_PASSWORD), ("ALICE", DEFAULT_PASSWORD)],
)
def test_wrong_credentials_get_one_401_answer_whatever_was_wrong(
    login: Login, user: User, username: str, password: str
) -> None:
    response = login(username, password)

    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid username or password.", "code": "invalid_credentials"}
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


def test_an_inactive_user_cannot_log_in(login: Login) -> None:
    UserFactory(username="gone", is_active=False)

    assert login("gone").status_code == 401


def test_missing_fields_are_400_field_errors(api: APIClient) -> None:
    response = api.post("/auth/login", {"username": "alice"}, format="json")

    assert response.status_code == 400
    assert response.json()["fields"] == {"password": ["This field is required."]}


def test_failures_for_one_username_are_throttled_with_retry_after(login: Login, user: User) -> None:
    for attempt in range(3):
        assert login("alice", "wrong", ip=f"10.0.0.{attempt}").status_code == 401

    throttled = login("alice", "wrong", ip="10.0.0.99")

    assert throttled.status_code == 429
    assert throttled.json()["code"] == "throttled"
    assert "Too many failed login attempts" in throttled.json()["detail"]
    assert 0 < int(throttled["Retry-After"]) <= 60
    # While throttled even the right password is refused, from anywhere, in any letter case.
    assert login("alice", ip="10.0.0.100").status_code == 429
    assert login("ALICE", ip="10.0.0.101").status_code == 429
    # Other users are unaffected.
    UserFactory(username="bob")
    assert login("bob", ip="10.0.0.102").status_code == 200


def test_a_few_failures_from_one_ip_lock_no_other_user_behind_it(login: Login, user: User) -> None:
    for name in ["a", "b", "c", "d", "e"]:
        assert login(name, "wrong", ip="192.0.2.7").status_code == 401

    assert login("alice", ip="192.0.2.7").status_code == 200


def test_failures_from_one_ip_are_throttled_across_usernames_at_the_ip_limit(login: Login, user: User) -> None:
    for name in ["a", "b", "c", "d", "e", "f"]:
        assert login(name, "wrong", ip="192.0.2.7").status_code == 401

    throttled = login("alice", ip="192.0.2.7")

    assert throttled.status_code == 429
    assert throttled.json()["code"] == "throttled"
    assert int(throttled["Retry-After"]) > 0
    assert login("alice", ip="192.0.2.8").status_code == 200


def test_successful_logins_do_not_use_up_the_ips_allowance(login: Login, user: User) -> None:
    for _ in range(10):
        assert login("alice", ip="192.0.2.9").status_code == 200

    UserFactory(username="bob")
    assert login("bob", ip="192.0.2.9").status_code == 200


def test_refused_attempts_count_nowhere(login: Login, user: User) -> None:
    for _ in range(3):
        assert login("alice", "wrong", ip="192.0.2.10").status_code == 401
    for _ in range(10):
        assert login("alice", "wrong", ip="192.0.2.10").status_code == 429

    # The IP has three failures, not thirteen: another user behind it still gets in.
    UserFactory(username="bob")
    assert login("bob", ip="192.0.2.10").status_code == 200


def test_only_failures_count_and_a_success_clears_the_usernames_failures(login: Login, user: User) -> None:
    for _ in range(5):
        assert login("alice", ip="10.1.0.1").status_code == 200

    assert login("alice", "wrong", ip="10.1.0.2").status_code == 401
    assert login("alice", "wrong", ip="10.1.0.3").status_code == 401
    assert login("alice", ip="10.1.0.4").status_code == 200
    # Two more failures would have made four: the success started the count again.
    assert login("alice", "wrong", ip="10.1.0.5").status_code == 401
    assert login("alice", "wrong", ip="10.1.0.6").status_code == 401
    assert login("alice", ip="10.1.0.7").status_code == 200


def test_the_throttle_lifts_when_the_window_ends(login: Login, user: User, settings: Any) -> None:
    settings.LOGIN_THROTTLE_WINDOW_S = 1
    for _ in range(3):
        login("alice", "wrong")
    throttled = login("alice")
    assert throttled.status_code == 429
    assert throttled["Retry-After"] == "1"

    time.sleep(1.2)

    assert login("alice").status_code == 200


def test_success_and_failure_are_logged_without_the_password(
    login: Login, user: User, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="accounts")

    login("alice", "Sup3r-secret-typo", ip="198.51.100.4")
    login("alice", ip="198.51.100.4")

    records = [r for r in caplog.records if r.name == "accounts"]
    messages = [r.getMessage() for r in records]
    assert messages == [
        "login failed: username=alice ip=198.51.100.4",
        f"login succeeded: id={user.pk} username=alice ip=198.51.100.4",
    ]
    assert [r.levelname for r in records] == ["WARNING", "INFO"]
    assert "Sup3r-secret-typo" not in caplog.text
    assert DEFAULT_PASSWORD not in caplog.text


@override_settings(
    CACHES={
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        }
    }
)
def test_login_still_works_without_the_cache_and_says_so_in_the_log(
    login: Login, user: User, caplog: pytest.LogCaptureFixture
) -> None:
    assert login("alice", "wrong").status_code == 401
    assert login("alice").status_code == 200

    warnings = [r.getMessage() for r in caplog.records if r.name == "accounts.throttling"]
    assert warnings == ["login throttle skipped: cache unavailable"] * 2
