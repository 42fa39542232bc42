"""A user's own limits (rpm_limit, budget_cost per budget_period): stored with database checks, edited in the
admin, carried by every one of their keys' policies, and seen by every process soon after they change."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.test import Client

from accounts.models import User
from keys.verification import KeyPolicy, KeyVerifier, key_verify
from tests.factories import ApiKeyFactory, UserFactory

pytestmark = pytest.mark.django_db

USERS = "/admin/accounts/user/"
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- storage ---------------------------------------------------------------------------------------
def test_a_user_has_no_limits_and_a_monthly_period_by_default() -> None:
    user = UserFactory()
    user.refresh_from_db()

    assert (user.rpm_limit, user.budget_cost, user.budget_period) == (None, None, "month")
    assert [value for value, _label in User.BudgetPeriod.choices] == ["day", "month", "total"]


@pytest.mark.parametrize(
    "fields", [{"budget_cost": Decimal("-0.000001")}, {"budget_period": "week"}, {"rpm_limit": -1}]
)
def test_the_database_refuses_a_negative_budget_an_unknown_period_and_a_negative_rate(fields: dict[str, Any]) -> None:
    user = UserFactory()

    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.filter(pk=user.pk).update(**fields)


def test_a_budget_keeps_six_decimal_places() -> None:
    user = UserFactory(budget_cost=Decimal("1234.567891"))
    user.refresh_from_db()

    assert user.budget_cost == Decimal("1234.567891")


# --- the policy --------------------------------------------------------------------------------------
def test_every_key_of_a_user_carries_the_users_limits() -> None:
    owner = UserFactory(rpm_limit=30, budget_cost=Decimal("12.5"), budget_period="day")
    unlimited_key, limited_key = ApiKeyFactory(owner=owner), ApiKeyFactory(owner=owner, rpm_limit=100)

    for key in (unlimited_key, limited_key):
        policy = key_verify(key.secret, None)
        assert (policy.user_rpm_limit, policy.user_budget_cost, policy.user_budget_period) == (
            30,
            Decimal("12.5"),
            "day",
        )
        assert policy.limited  # the user's limits alone make the key's calls limited
    assert key_verify(limited_key.secret, None).rpm_limit == 100


def test_a_key_of_a_user_without_limits_is_unlimited() -> None:
    policy = key_verify(ApiKeyFactory().secret, None)

    assert (policy.user_rpm_limit, policy.user_budget_cost, policy.user_budget_period) == (None, None, "month")
    assert not policy.limited


def test_the_users_limits_survive_the_shared_cache() -> None:
    owner = UserFactory(rpm_limit=7, budget_cost=Decimal("0.000001"), budget_period="total")
    key = ApiKeyFactory(owner=owner, budget_cost=Decimal("3"))
    from_db = KeyVerifier().verify(key.secret, None)

    from_shared = KeyVerifier().verify(key.secret, None)  # fresh memory, same shared cache

    assert from_shared == from_db
    assert (from_shared.user_rpm_limit, from_shared.user_budget_cost, from_shared.user_budget_period) == (
        7,
        Decimal("0.000001"),
        "total",
    )
    assert isinstance(from_shared.user_budget_cost, Decimal)


# --- invalidation ------------------------------------------------------------------------------------
def _policy_within(verifier: KeyVerifier, secret: str, wanted: Any, seconds: float) -> tuple[KeyPolicy, float]:
    start = time.monotonic()
    while True:
        policy = verifier.verify(secret, None)
        if wanted(policy) or time.monotonic() - start > seconds:
            return policy, time.monotonic() - start
        time.sleep(0.01)


def test_a_cached_policy_sees_a_users_new_limits_in_every_process_within_the_sync_interval(run_on_commit: Any) -> None:
    """Two verifiers with their own memory share only the Django cache (Redis when REDIS_URL is set)."""
    owner = UserFactory(rpm_limit=10)
    key = ApiKeyFactory(owner=owner)
    worker_a, worker_b = KeyVerifier(), KeyVerifier()
    assert worker_a.verify(key.secret, None).user_rpm_limit == 10
    assert worker_b.verify(key.secret, None).user_rpm_limit == 10

    with run_on_commit():
        owner.rpm_limit = 5
        owner.budget_cost = Decimal("2")
        owner.budget_period = "day"
        owner.save()

    bound = settings.CACHE_SYNC_INTERVAL_S + 0.5
    for worker in (worker_a, worker_b):
        policy, elapsed = _policy_within(worker, key.secret, lambda p: p.user_rpm_limit == 5, bound)
        assert (policy.user_rpm_limit, policy.user_budget_cost, policy.user_budget_period) == (5, Decimal(2), "day")
        assert elapsed < bound


_CHILD = """
import sys, time
import django
django.setup()
from keys.verification import KeyVerifier

secret = sys.stdin.readline().strip()
verifier = KeyVerifier()
print("ready", verifier.verify(secret, None).user_rpm_limit, flush=True)
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    policy = verifier.verify(secret, None)
    if policy.user_rpm_limit != 10:
        print("changed", policy.user_rpm_limit, policy.user_budget_cost, time.time(), flush=True)
        break
    time.sleep(0.005)
else:
    print("unchanged", flush=True)
"""


def _database_url() -> str:
    db = connection.settings_dict
    credentials = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL: the processes share the cache through Redis")
def test_another_process_sees_a_users_new_limit_within_the_sync_interval() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: the child process must reach the test database (SQLite's is in memory)")
    owner = UserFactory(rpm_limit=10)
    key = ApiKeyFactory(owner=owner)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "apiforge.settings",
        "APP_ENV": "test",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CACHE_KEY_PREFIX": settings.CACHE_KEY_PREFIX,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write(key.secret + "\n")
        child.stdin.flush()
        ready = child.stdout.readline().split()
        assert ready == ["ready", "10"], child.stderr.read() if child.stderr else ready
        time.sleep(0.3)  # the child is answering from its memory now

        owner.rpm_limit = 4
        owner.budget_cost = Decimal("0.5")
        owner.save(update_fields=["rpm_limit", "budget_cost"])  # autocommit: the invalidation is sent at once
        committed_at = time.time()

        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    word, rpm, cost, seen_at = out.split()
    assert (word, rpm, Decimal(cost)) == ("changed", "4", Decimal("0.5")), err
    assert float(seen_at) - committed_at < settings.CACHE_SYNC_INTERVAL_S + 1.0


@pytest.mark.parametrize("field", ["rpm_limit", "budget_cost", "budget_period"])
def test_saving_only_a_limit_field_drops_the_cached_policies(field: str, run_on_commit: Any) -> None:
    owner = UserFactory()
    key = ApiKeyFactory(owner=owner)
    key_verify(key.secret, None)
    value = {"rpm_limit": 3, "budget_cost": Decimal("1.5"), "budget_period": "total"}[field]

    with run_on_commit():
        setattr(owner, field, value)
        owner.save(update_fields=[field])

    assert getattr(key_verify(key.secret, None), f"user_{field}") == value


def test_a_save_that_names_no_limit_field_keeps_the_cached_policies(
    run_on_commit: Any, django_assert_num_queries: Any
) -> None:
    owner = UserFactory()
    key = ApiKeyFactory(owner=owner)
    key_verify(key.secret, None)

    with run_on_commit():
        owner.display_name = "Renamed"
        owner.save(update_fields=["display_name", "last_login"])  # e.g. the last_login update of every login

    with django_assert_num_queries(0):
        key_verify(key.secret, None)


# --- the admin ---------------------------------------------------------------------------------------
def _user_form(user: User, **overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "username": user.username,
        "email": user.email,
        "display_name": user.display_name,
        "first_name": "",
        "last_name": "",
        "is_active": "on",
        "rpm_limit": "",
        "budget_cost": "",
        "budget_period": "month",
        "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
    }
    form.update(overrides)
    return form


def test_the_user_admin_shows_the_limits_as_shared_by_all_keys(admin_client_: Client, user: User) -> None:
    page = admin_client_.get(f"{USERS}{user.pk}/change/")

    assert page.status_code == 200
    fieldsets = dict(page.context["adminform"].fieldsets)
    assert fieldsets["Limits"]["fields"] == ("rpm_limit", "budget_cost", "budget_period")
    assert "Shared by all of this user's API keys" in fieldsets["Limits"]["description"]
    assert "Shared by all of this user" in page.content.decode()


def test_limits_set_in_the_user_admin_reach_the_users_keys(
    admin_client_: Client, user: User, run_on_commit: Any
) -> None:
    key = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)

    with run_on_commit():
        answer = admin_client_.post(
            f"{USERS}{user.pk}/change/", _user_form(user, rpm_limit="40", budget_cost="9.75", budget_period="day")
        )

    assert answer.status_code == 302, answer.content[:2000]
    user.refresh_from_db()
    assert (user.rpm_limit, user.budget_cost, user.budget_period) == (40, Decimal("9.75"), "day")
    policy = key_verify(key.secret, None)
    assert (policy.user_rpm_limit, policy.user_budget_cost, policy.user_budget_period) == (40, Decimal("9.75"), "day")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rpm_limit", "-1"),
        ("rpm_limit", "1.5"),
        ("rpm_limit", "many"),
        ("budget_cost", "-0.01"),
        ("budget_cost", "0.0000001"),
        ("budget_cost", "123456789012345"),
        ("budget_period", "week"),
    ],
)
def test_the_user_admin_refuses_bad_limits(admin_client_: Client, user: User, field: str, value: str) -> None:
    answer = admin_client_.post(f"{USERS}{user.pk}/change/", _user_form(user, **{field: value}))

    assert answer.status_code == 200
    assert field in answer.context["adminform"].form.errors
    user.refresh_from_db()
    assert (user.rpm_limit, user.budget_cost, user.budget_period) == (None, None, "month")
