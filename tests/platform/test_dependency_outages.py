"""When the shared cache or the database is unreachable, writes fail cleanly (503) instead of being lost.

No mocks: the cache is pointed at a closed port (a real django-redis client that cannot connect) and the
database connection at a port or file that does not exist, exactly what a worker sees during an outage.
"""

from __future__ import annotations

import contextlib
import copy
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from apiforge.local_cache import CacheUnavailable
from keys.exceptions import KeyRefused
from keys.models import ApiKey
from keys.services import key_revoke
from keys.verification import KeyVerifier
from proxy.catalog import catalog_get
from proxy.models import Upstream
from tests.factories import ApiKeyFactory, UserFactory

pytestmark = pytest.mark.django_db


def _unreachable_cache() -> dict[str, Any]:
    return {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens on port 1
            "KEY_PREFIX": django_settings.CACHE_KEY_PREFIX,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
        }
    }


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _client(user: Any) -> APIClient:
    client = APIClient(REMOTE_ADDR="198.51.100.7")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
    return client


def _assert_unavailable(answer: Any, code: str) -> None:
    assert answer.status_code == 503, answer.content
    assert answer["Retry-After"].isdigit()
    body = answer.json()
    assert body["code"] == code
    assert set(body) == {"detail", "code"}


# --- hole 4: an invalidation that cannot be published fails the write ----------------------------------
def test_revoking_a_key_while_the_cache_is_unreachable_answers_503_and_revokes_nothing(settings):
    owner = UserFactory()
    key = ApiKeyFactory(owner=owner)
    other_worker = KeyVerifier()
    assert other_worker.verify(key.secret, None).key_id == key.pk  # another instance has it in memory

    settings.CACHES = _unreachable_cache()
    answer = _client(owner).delete(f"/api/keys/{key.pk}/")

    _assert_unavailable(answer, "cache_unavailable")
    assert "not saved" in answer.json()["detail"]
    key.refresh_from_db()
    assert key.revoked_at is None
    assert key.is_active


def test_the_same_revocation_succeeds_once_the_cache_is_back_and_reaches_other_workers(settings):
    owner = UserFactory()
    key = ApiKeyFactory(owner=owner)
    other_worker = KeyVerifier()
    other_worker.verify(key.secret, None)
    settings.CACHES = _unreachable_cache()
    assert _client(owner).delete(f"/api/keys/{key.pk}/").status_code == 503

    settings.CACHES = _original_caches()
    with _sync_immediately(settings):
        assert _client(owner).delete(f"/api/keys/{key.pk}/").status_code == 204
        with pytest.raises(KeyRefused) as refused:
            other_worker.verify(key.secret, None)
    assert refused.value.reason == "revoked"


def test_a_cache_that_dies_between_the_write_and_its_commit_is_reported_as_saved_but_unpublished(
    settings, django_capture_on_commit_callbacks
):
    key = ApiKeyFactory()
    with pytest.raises(CacheUnavailable) as raised:  # noqa: PT012  (the failure comes when the commit runs)
        with django_capture_on_commit_callbacks(execute=True):
            key_revoke(key=key)
            settings.CACHES = _unreachable_cache()
    assert raised.value.committed
    assert "was saved" in str(raised.value)
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None


def test_upstream_and_model_writes_while_the_cache_is_unreachable_answer_503_and_change_nothing(settings):
    admin = UserFactory(superuser=True)
    upstream = Upstream.objects.create(name="up", kind="mock")
    catalog_get()  # this worker holds the catalog in memory

    settings.CACHES = _unreachable_cache()
    client = _client(admin)
    _assert_unavailable(
        client.patch(f"/api/upstreams/{upstream.pk}/", {"timeout_s": 7}, format="json"), "cache_unavailable"
    )
    _assert_unavailable(
        client.post(
            "/api/models/",
            {"name": "m1", "deployments": [{"upstream": "up", "upstream_model": "x", "weight": 1}]},
            format="json",
        ),
        "cache_unavailable",
    )
    upstream.refresh_from_db()
    assert upstream.timeout_s != 7
    assert not upstream.deployments.exists()


def test_without_a_transaction_a_strict_invalidation_still_raises(settings):
    settings.CACHES = _unreachable_cache()
    with pytest.raises(CacheUnavailable):
        KeyVerifier().invalidate(["x" * 64], strict=True)
    KeyVerifier().invalidate(["x" * 64])  # the lenient form (used by tests and tooling) only warns


# --- hole 12: the management API and the admin answer 503 while the database is down -------------------
def _really_close() -> None:
    # Django keeps an in-memory SQLite connection open on close(); the base class's close() does close it.
    BaseDatabaseWrapper.close(connection)


@contextlib.contextmanager
def _database_down(**pool: Any) -> Iterator[None]:
    saved = copy.deepcopy(connection.settings_dict)
    # SQLite's test database lives in memory only while a connection to it is open: keep one aside.
    keeper = sqlite3.connect(saved["NAME"], uri=True) if connection.vendor == "sqlite" else None
    _really_close()
    if connection.vendor == "postgresql":
        connection.close_pool()
        connection.settings_dict["PORT"] = "1"
        if "pool" in connection.settings_dict["OPTIONS"]:
            connection.settings_dict["OPTIONS"]["pool"] = {"min_size": 0, "max_size": 2, "timeout": 0.5, **pool}
    else:
        connection.settings_dict["NAME"] = "/nonexistent-apiforge-dir/db.sqlite3"
    try:
        yield
    finally:
        _really_close()
        if connection.vendor == "postgresql":
            connection.close_pool()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)
        if keeper is not None:
            connection.ensure_connection()  # before the keeper lets go of the in-memory database
            keeper.close()


@pytest.mark.django_db(transaction=True)
def test_management_api_answers_503_in_its_error_shape_while_the_database_is_down(caplog):
    user = UserFactory()
    client = _client(user)
    with _database_down():
        for answer in (client.get("/api/keys/"), client.post("/api/keys/", {"name": "x"}, format="json")):
            _assert_unavailable(answer, "database_unavailable")
        login = APIClient().post("/auth/login", {"username": user.username, "password": "whatever"}, format="json")
        _assert_unavailable(login, "database_unavailable")
    assert client.get("/api/keys/").status_code == 200  # and it recovers with the database
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("database_unavailable" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.django_db(transaction=True)
def test_admin_answers_503_while_the_database_is_down(client):
    admin = UserFactory(superuser=True)
    client.force_login(admin)
    with _database_down():
        answer = client.get("/admin/keys/apikey/")
    _assert_unavailable(answer, "database_unavailable")
    assert client.get("/admin/keys/apikey/").status_code == 200


# --- hole 11: a bounded connection pool; exhausted -> 503 -----------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_an_exhausted_connection_pool_answers_503_with_retry_after():
    if connection.vendor != "postgresql":
        pytest.skip("the connection pool is PostgreSQL's (psycopg_pool); SQLite has no pool")
    assert django_settings.DATABASES["default"]["OPTIONS"]["pool"]["max_size"] >= 1
    user = UserFactory()
    client = _client(user)
    saved = copy.deepcopy(connection.settings_dict)
    connection.close()
    connection.close_pool()
    connection.settings_dict["OPTIONS"]["pool"] = {"min_size": 0, "max_size": 1, "timeout": 0.3}
    connection.pool.open(wait=True)
    held = connection.pool.getconn()  # another request holds the only connection
    try:
        _assert_unavailable(client.get("/api/keys/"), "database_unavailable")
    finally:
        connection.pool.putconn(held)
    try:
        assert client.get("/api/keys/").status_code == 200  # a free connection again: served
    finally:
        connection.close()
        connection.close_pool()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)


def test_postgresql_settings_bound_the_pool_from_the_environment():
    from apiforge import settings as module

    if module.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("pool settings apply to PostgreSQL")
    pool = module.DATABASES["default"]["OPTIONS"]["pool"]
    assert pool["max_size"] == 10
    assert pool["timeout"] == 5.0
    assert module.DATABASES["default"]["CONN_MAX_AGE"] == 0
    with transaction.atomic():
        assert connection.pool is not None


# --- helpers -----------------------------------------------------------------------------------------------
_ORIGINAL_CACHES = copy.deepcopy(django_settings.CACHES)


def _original_caches() -> dict[str, Any]:
    return copy.deepcopy(_ORIGINAL_CACHES)


@contextlib.contextmanager
def _sync_immediately(settings: Any) -> Iterator[None]:
    interval = django_settings.CACHE_SYNC_INTERVAL_S
    settings.CACHE_SYNC_INTERVAL_S = 0
    try:
        yield
    finally:
        settings.CACHE_SYNC_INTERVAL_S = interval
