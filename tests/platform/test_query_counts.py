"""Query-count baselines of the list endpoints and admin changelists: flat between 3 and 30 rows (no N+1).

Each test renders the page with 3 rows, adds 27 more and renders it again: both answers must take the
same number of queries (the API pages hold 20 rows, so the second answer has more rows to show), and
that number is the page's baseline, so that a new per-request query is noticed too (NetBox keeps such
baselines per app). A change that needs one more query updates the baseline here, on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from tests.factories import ApiKeyFactory, UserFactory
from tests.proxy.factories import DeploymentFactory, ModelFactory, UpstreamFactory

pytestmark = pytest.mark.django_db

FEW, MANY = 3, 30


def _api_client(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
    return client


def _admin_client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as context:
        response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return len(context.captured_queries)


def _assert_flat(client: Client, url: str, add_rows: Callable[[int], object], *, baseline: int) -> None:
    add_rows(FEW)
    few = _queries(client, url)
    add_rows(MANY - FEW)
    many = _queries(client, url)
    assert many == few, f"{url}: {few} queries with {FEW} rows, {many} with {MANY}"
    assert few == baseline, f"{url}: {few} queries, the baseline is {baseline}"


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    # Thirty owners, each with a hashed password: the default PBKDF2 cost would dominate the run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _models_with_deployments(count: int) -> None:
    upstream = UpstreamFactory()
    for model in ModelFactory.create_batch(count):
        DeploymentFactory.create_batch(2, model=model, upstream=upstream)


@pytest.fixture
def staff() -> User:
    return UserFactory(superuser=True)


@pytest.fixture
def user() -> User:
    return UserFactory()


def test_the_key_list_takes_as_many_queries_for_30_keys_as_for_3(user: User) -> None:
    # JWT user, COUNT, page, and the page's budget spend from the ledger (one query for all its keys).
    _assert_flat(_api_client(user), "/api/keys/", lambda n: ApiKeyFactory.create_batch(n, owner=user), baseline=4)


def test_the_staff_key_list_takes_as_many_queries_for_30_keys_of_several_owners_as_for_3(staff: User) -> None:
    _assert_flat(_api_client(staff), "/api/keys/", lambda n: ApiKeyFactory.create_batch(n), baseline=4)


def test_the_staff_model_list_with_deployments_takes_as_many_queries_for_30_models_as_for_3(staff: User) -> None:
    _assert_flat(_api_client(staff), "/api/models/", _models_with_deployments, baseline=4)


def test_a_users_model_list_takes_as_many_queries_for_30_models_as_for_3(user: User) -> None:
    ApiKeyFactory(owner=user)  # no model scope: every active model may be called

    _assert_flat(_api_client(user), "/api/models/", _models_with_deployments, baseline=4)


def test_the_upstream_list_takes_as_many_queries_for_30_upstreams_as_for_3(staff: User) -> None:
    _assert_flat(_api_client(staff), "/api/upstreams/", lambda n: UpstreamFactory.create_batch(n), baseline=3)


def test_the_key_changelist_takes_as_many_queries_for_30_keys_as_for_3(staff: User) -> None:
    _assert_flat(_admin_client(staff), "/admin/keys/apikey/", lambda n: ApiKeyFactory.create_batch(n), baseline=8)


def test_the_model_changelist_takes_as_many_queries_for_30_models_as_for_3(staff: User) -> None:
    _assert_flat(_admin_client(staff), "/admin/proxy/model/", _models_with_deployments, baseline=6)


def test_the_upstream_changelist_takes_as_many_queries_for_30_upstreams_as_for_3(staff: User) -> None:
    # 5 + the deployments' ids (breakers column) + the last day's usage per upstream (one statistics selector call).
    _assert_flat(_admin_client(staff), "/admin/proxy/upstream/", lambda n: UpstreamFactory.create_batch(n), baseline=11)
