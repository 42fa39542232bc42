"""One login lockout for every path (the API, the admin, authenticate() itself), even under concurrent guesses."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import aauthenticate, authenticate
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.db import connection
from django.test import Client, override_settings
from rest_framework.test import APIClient

from accounts.exceptions import LoginThrottled
from accounts.models import User
from accounts.throttling import LoginAttempt, _Counter, login_attempt_abandoned, login_attempt_succeeded
from tests.accounts.hashers import CountingSlowHasher
from tests.factories import DEFAULT_PASSWORD, UserFactory

LIMIT = 5
THROTTLED_MESSAGE = "Too many failed login attempts. Try again in"
WRONG_PASSWORD_MESSAGE = "Please enter the correct username and password"


@pytest.fixture(autouse=True)
def _counting_hasher(settings: Any) -> Iterator[None]:
    settings.PASSWORD_HASHERS = ["tests.accounts.hashers.CountingSlowHasher"]
    settings.LOGIN_THROTTLE_FAILURES = LIMIT
    settings.LOGIN_THROTTLE_IP_FAILURES = 50
    settings.LOGIN_THROTTLE_WINDOW_S = 300
    CountingSlowHasher.reset()
    yield
    CountingSlowHasher.reset()


@pytest.fixture
def root(transactional_db: None) -> User:
    return UserFactory(username="root", superuser=True)


def _api_login(username: str, password: str, ip: str = "127.0.0.1", client: APIClient | None = None) -> Any:
    return (client or APIClient()).post(
        "/auth/login", {"username": username, "password": password}, format="json", REMOTE_ADDR=ip
    )


def _admin_login(username: str, password: str, ip: str = "127.0.0.1", client: Client | None = None) -> Any:
    return (client or Client()).post(
        "/admin/login/", {"username": username, "password": password, "next": "/admin/"}, REMOTE_ADDR=ip
    )


def _admin_outcome(response: Any) -> str:
    """'in' (redirected into the admin), 'throttled' or 'wrong' for an admin login answer."""
    if response.status_code == 302:
        return "in"
    content = response.content.decode()
    if THROTTLED_MESSAGE in content:
        return "throttled"
    assert WRONG_PASSWORD_MESSAGE in content, content[:2000]
    return "wrong"


def _api_outcome(response: Any) -> str:
    outcome = {200: "in", 401: "wrong", 429: "throttled"}[response.status_code]
    if outcome == "throttled":
        assert set(response.json()) == {"detail", "code"}
        assert response.json()["code"] == "throttled"
        assert 0 < int(response["Retry-After"]) <= 300
    return outcome


def _concurrently(calls: list[Callable[[], str]]) -> list[str]:
    """Run every call in its own thread, all released at once; their outcomes, in order."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[str] = [""] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], str]) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[index] = call()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return outcomes


# --- sequential guesses ---------------------------------------------------------------------------------


def test_thirty_wrong_admin_passwords_are_stopped_at_the_limit_and_then_the_right_one_is_refused(root: User) -> None:
    outcomes = [_admin_outcome(_admin_login("root", f"guess-{i}")) for i in range(30)]

    assert outcomes == ["wrong"] * LIMIT + ["throttled"] * (30 - LIMIT)
    assert CountingSlowHasher.checks == LIMIT
    refused = _admin_login("root", DEFAULT_PASSWORD)
    assert _admin_outcome(refused) == "throttled"
    assert CountingSlowHasher.checks == LIMIT  # the right password was not even checked
    assert "_auth_user_id" not in refused.wsgi_request.session


def test_wrong_api_passwords_are_stopped_at_the_limit(root: User) -> None:
    outcomes = [_api_outcome(_api_login("root", f"guess-{i}", ip=f"10.0.0.{i}")) for i in range(20)]

    assert outcomes == ["wrong"] * LIMIT + ["throttled"] * (20 - LIMIT)
    assert CountingSlowHasher.checks == LIMIT


def test_locked_through_the_api_the_admin_refuses_the_right_password(root: User) -> None:
    for i in range(LIMIT):
        assert _api_outcome(_api_login("root", f"guess-{i}")) == "wrong"

    response = _admin_login("root", DEFAULT_PASSWORD, ip="203.0.113.9")

    assert _admin_outcome(response) == "throttled"
    assert CountingSlowHasher.checks == LIMIT


def test_locked_through_the_admin_the_api_refuses_the_right_password(root: User) -> None:
    for i in range(LIMIT):
        assert _admin_outcome(_admin_login("root", f"guess-{i}")) == "wrong"

    response = _api_login("root", DEFAULT_PASSWORD, ip="203.0.113.9")

    assert _api_outcome(response) == "throttled"
    assert response.json()["detail"].startswith(THROTTLED_MESSAGE)
    assert CountingSlowHasher.checks == LIMIT


def test_the_admin_still_lets_the_right_password_in_below_the_limit(root: User) -> None:
    for i in range(LIMIT - 1):
        assert _admin_outcome(_admin_login("root", f"guess-{i}")) == "wrong"

    assert _admin_outcome(_admin_login("root", DEFAULT_PASSWORD)) == "in"
    # The success cleared the count: a full allowance again.
    for i in range(LIMIT):
        assert _admin_outcome(_admin_login("root", f"again-{i}")) == "wrong"


def test_authenticate_itself_is_throttled_for_every_caller_with_or_without_a_request(root: User) -> None:
    for i in range(LIMIT):
        assert authenticate(username="root", password=f"guess-{i}") is None

    with pytest.raises(LoginThrottled) as raised:
        authenticate(username="root", password=DEFAULT_PASSWORD)
    with pytest.raises(LoginThrottled):
        async_to_sync(aauthenticate)(username="root", password=DEFAULT_PASSWORD)

    assert raised.value.retry_after is not None
    assert 0 < raised.value.retry_after <= 300
    assert CountingSlowHasher.checks == LIMIT


def test_the_async_authenticate_checks_the_password_like_the_sync_one(root: User) -> None:
    assert async_to_sync(aauthenticate)(username="root", password="wrong") is None
    user = async_to_sync(aauthenticate)(username="root", password=DEFAULT_PASSWORD)

    assert user is not None
    assert user.pk == root.pk


def test_credentials_without_a_username_or_password_are_not_counted(root: User) -> None:
    for _ in range(LIMIT + 2):
        assert authenticate(username="root") is None
        assert authenticate(password="x") is None

    assert authenticate(username="root", password=DEFAULT_PASSWORD) is not None
    assert CountingSlowHasher.checks == 1


def test_an_error_while_checking_gives_the_attempt_back(root: User) -> None:
    with mock.patch.object(ModelBackend, "authenticate", side_effect=RuntimeError("database gone")):
        for _ in range(LIMIT + 2):
            with pytest.raises(RuntimeError):
                authenticate(username="root", password="whatever")

    assert authenticate(username="root", password=DEFAULT_PASSWORD) is not None


@override_settings(
    CACHES={
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
        }
    }
)
def test_giving_back_reservations_without_the_cache_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    attempt = LoginAttempt((_Counter("throttle:test:x", 5, clear_on_success=False),))

    login_attempt_succeeded(attempt)
    login_attempt_abandoned(attempt)

    warnings = [r.getMessage() for r in caplog.records if r.name == "accounts.throttling"]
    assert warnings == [
        "login failures not cleared: cache unavailable",
        "login attempt not given back: cache unavailable",
    ]


def test_a_window_that_ends_between_add_and_incr_starts_the_next_one(root: User) -> None:
    real_incr = cache.incr
    calls = {"n": 0}

    def incr_after_expiry(key: str, delta: int = 1) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            cache.delete(key)  # the window ends just now
        return real_incr(key, delta)

    assert authenticate(username="root", password="wrong") is None  # the counters exist from here on
    with mock.patch.object(cache, "incr", side_effect=incr_after_expiry):
        assert authenticate(username="root", password="wrong-again") is None

    assert CountingSlowHasher.checks == 2


# --- concurrent guesses ---------------------------------------------------------------------------------

PARALLEL = 24


def test_parallel_wrong_api_passwords_check_at_most_the_limit(root: User) -> None:
    calls = [lambda i=i: _api_outcome(_api_login("root", f"guess-{i}", ip=f"10.9.0.{i}")) for i in range(PARALLEL)]

    outcomes = _concurrently(calls)

    assert CountingSlowHasher.checks == LIMIT
    assert outcomes.count("wrong") == LIMIT
    assert outcomes.count("throttled") == PARALLEL - LIMIT


def test_parallel_wrong_admin_passwords_check_at_most_the_limit(root: User) -> None:
    calls = [lambda i=i: _admin_outcome(_admin_login("root", f"guess-{i}")) for i in range(PARALLEL)]

    outcomes = _concurrently(calls)

    assert CountingSlowHasher.checks == LIMIT
    assert outcomes.count("wrong") == LIMIT
    assert outcomes.count("throttled") == PARALLEL - LIMIT


def test_parallel_guesses_on_both_paths_share_one_limit_and_then_the_right_password_is_refused(root: User) -> None:
    calls: list[Callable[[], str]] = []
    for i in range(PARALLEL):
        if i % 2:
            calls.append(lambda i=i: _admin_outcome(_admin_login("root", f"guess-{i}", ip="198.51.100.1")))
        else:
            calls.append(lambda i=i: _api_outcome(_api_login("root", f"guess-{i}", ip="198.51.100.2")))

    outcomes = _concurrently(calls)

    assert CountingSlowHasher.checks == LIMIT
    assert outcomes.count("wrong") == LIMIT
    assert _api_outcome(_api_login("root", DEFAULT_PASSWORD)) == "throttled"
    assert _admin_outcome(_admin_login("root", DEFAULT_PASSWORD)) == "throttled"
    assert CountingSlowHasher.checks == LIMIT


def test_parallel_direct_authenticate_calls_check_at_most_the_limit(root: User) -> None:
    def guess(i: int) -> str:
        try:
            return "wrong" if authenticate(username="root", password=f"guess-{i}") is None else "in"
        except LoginThrottled:
            return "throttled"

    outcomes = _concurrently([lambda i=i: guess(i) for i in range(PARALLEL)])

    assert CountingSlowHasher.checks == LIMIT
    assert sorted(outcomes) == ["throttled"] * (PARALLEL - LIMIT) + ["wrong"] * LIMIT


def test_a_counter_whose_window_ended_has_nothing_to_give_back_and_a_full_window_to_wait(settings: Any) -> None:
    from accounts.throttling import _give_back, _retry_after

    _give_back("throttle:test:gone")  # no error

    assert cache.get("throttle:test:gone:n") is None
    assert _retry_after("throttle:test:gone", 300) == 300
