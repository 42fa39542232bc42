"""The staff management API for upstreams and models: /api/upstreams/ and /api/models/.

"Staff" here is a staff member holding the proxy app's model permissions: ``is_staff`` alone grants nothing
(see apiforge/permissions.py and the "who may" sections below).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

import keys.selectors
from accounts.models import User
from gateway_stats.models import AuditEvent
from proxy.encryption import secret_decrypt
from proxy.models import Deployment, Model, Upstream
from tests.factories import UserFactory
from tests.proxy.factories import DeploymentFactory, ModelFactory, UpstreamFactory

try:
    from keys.services import key_create, key_revoke
except ImportError:  # the keys app is written alongside; these tests wait for it
    key_create = key_revoke = None  # type: ignore[assignment]

pytestmark = pytest.mark.django_db

SECRET = "sk-upstream-VERY-secret-0123456789"
HEADER_SECRET = "org-header-secret-42"
UPSTREAMS = "/api/upstreams/"
MODELS = "/api/models/"


def _client(user: User | None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
    return client


def _staff_with(*codenames: str) -> User:
    """A staff member holding exactly these ``proxy`` permissions."""
    staff = UserFactory(staff=True)
    staff.user_permissions.set(Permission.objects.filter(content_type__app_label="proxy", codename__in=codenames))
    return staff


@pytest.fixture
def staff() -> User:
    """A staff member holding every proxy model permission (upstreams, models, deployments), not a superuser."""
    perms = [f"{action}_{name}" for action in ("view", "add", "change", "delete") for name in ("upstream", "model")]
    return _staff_with(*perms, "view_deployment", "add_deployment", "change_deployment", "delete_deployment")


@pytest.fixture
def staff_client(staff: User) -> APIClient:
    return _client(staff)


@pytest.fixture
def user() -> User:
    return UserFactory()


@pytest.fixture
def user_client(user: User) -> APIClient:
    return _client(user)


def _upstream_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "openai-main",
        "kind": "openai",
        "base_url": "https://api.openai.example/v1",
        "api_key": SECRET,
        "timeout_s": 20,
        "max_retries": 3,
        "extra_headers": {"OpenAI-Organization": HEADER_SECRET},
    }
    body.update(overrides)
    return body


def _has_field_error(body: dict[str, Any], field: str) -> bool:
    """Whether the error answer names ``field`` or a path inside it (dotted: ``deployments.0.weight``)."""
    return any(name == field or name.startswith(f"{field}.") for name in body["fields"])


def _raw_upstream_row(pk: int) -> tuple[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key_encrypted, name FROM proxy_upstream WHERE id = %s", [pk])
        row = cursor.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


# --- upstreams: create, read, secrets ------------------------------------------------------------


def test_staff_creates_an_upstream_whose_key_is_stored_encrypted_and_never_answered(staff_client: APIClient) -> None:
    response = staff_client.post(UPSTREAMS, _upstream_body(), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert "api_key" not in body
    assert body["has_api_key"] is True
    assert body["extra_headers"] == {"OpenAI-Organization": "***"}
    assert SECRET not in response.content.decode()
    assert HEADER_SECRET not in response.content.decode()
    assert set(body) == {
        "id",
        "name",
        "kind",
        "base_url",
        "has_api_key",
        "timeout_s",
        "max_retries",
        "extra_headers",
        "is_active",
        "breaker_failure_threshold",
        "breaker_cooldown_s",
        "created_at",
        "updated_at",
    }

    ciphertext, _ = _raw_upstream_row(body["id"])
    assert ciphertext
    assert SECRET not in ciphertext
    assert secret_decrypt(ciphertext) == SECRET
    assert Upstream.objects.get(pk=body["id"]).extra_headers == {"OpenAI-Organization": HEADER_SECRET}

    for url in (UPSTREAMS, f"{UPSTREAMS}{body['id']}/"):
        answer = staff_client.get(url)
        assert answer.status_code == 200
        assert SECRET not in answer.content.decode()
        assert HEADER_SECRET not in answer.content.decode()
        assert ciphertext not in answer.content.decode()


def test_upstream_list_is_paginated_searchable_and_filterable(staff_client: APIClient) -> None:
    UpstreamFactory(name="alpha-openai")
    UpstreamFactory(name="beta-openai", is_active=False)
    UpstreamFactory(name="gamma-mock", mock=True)

    body = staff_client.get(UPSTREAMS).json()
    assert set(body) == {"count", "next", "previous", "results"}
    assert body["count"] == 3
    assert [row["name"] for row in body["results"]] == ["alpha-openai", "beta-openai", "gamma-mock"]

    assert [r["name"] for r in staff_client.get(UPSTREAMS, {"search": "beta"}).json()["results"]] == ["beta-openai"]
    assert [r["name"] for r in staff_client.get(UPSTREAMS, {"kind": "mock"}).json()["results"]] == ["gamma-mock"]
    inactive = staff_client.get(UPSTREAMS, {"is_active": "false"}).json()["results"]
    assert [r["name"] for r in inactive] == ["beta-openai"]


def test_upstream_list_query_count_does_not_grow_with_rows(staff_client: APIClient) -> None:
    UpstreamFactory.create_batch(2, api_key=SECRET)
    with CaptureQueriesContext(connection) as few:
        assert staff_client.get(UPSTREAMS).status_code == 200
    UpstreamFactory.create_batch(8, api_key=SECRET)
    with CaptureQueriesContext(connection) as many:
        assert staff_client.get(UPSTREAMS).json()["count"] == 10
    assert len(many.captured_queries) == len(few.captured_queries)


def test_patch_without_api_key_keeps_it_and_an_empty_one_clears_it(staff_client: APIClient) -> None:
    upstream = UpstreamFactory(api_key=SECRET)
    url = f"{UPSTREAMS}{upstream.pk}/"

    kept = staff_client.patch(url, {"timeout_s": 5}, format="json")
    assert kept.status_code == 200, kept.content
    assert kept.json()["has_api_key"] is True
    upstream.refresh_from_db()
    assert upstream.api_key == SECRET
    assert upstream.timeout_s == 5

    replaced = staff_client.patch(url, {"api_key": "sk-new-one"}, format="json")
    assert replaced.status_code == 200
    assert "sk-new-one" not in replaced.content.decode()
    upstream.refresh_from_db()
    assert upstream.api_key == "sk-new-one"

    cleared = staff_client.patch(url, {"api_key": ""}, format="json")
    assert cleared.status_code == 200
    assert cleared.json()["has_api_key"] is False
    assert _raw_upstream_row(upstream.pk)[0] == ""


def test_patch_with_masked_header_values_keeps_the_stored_values(staff_client: APIClient) -> None:
    upstream = UpstreamFactory(extra_headers={"OpenAI-Organization": HEADER_SECRET, "X-Team": "a"})
    url = f"{UPSTREAMS}{upstream.pk}/"
    shown = staff_client.get(url).json()["extra_headers"]
    assert shown == {"OpenAI-Organization": "***", "X-Team": "***"}

    response = staff_client.patch(url, {"extra_headers": {**shown, "X-Team": "b"}}, format="json")

    assert response.status_code == 200, response.content
    upstream.refresh_from_db()
    assert upstream.extra_headers == {"OpenAI-Organization": HEADER_SECRET, "X-Team": "b"}


def test_put_is_not_offered(staff_client: APIClient) -> None:
    upstream = UpstreamFactory()
    assert staff_client.put(f"{UPSTREAMS}{upstream.pk}/", _upstream_body(), format="json").status_code == 405


# --- upstreams: validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"base_url": ""}, "base_url"),
        ({"base_url": "ftp://files.example/v1"}, "base_url"),
        ({"base_url": "not a url"}, "base_url"),
        ({"kind": "grpc"}, "kind"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": -3}, "timeout_s"),
        ({"max_retries": 11}, "max_retries"),
        ({"max_retries": -1}, "max_retries"),
        ({"breaker_failure_threshold": 0}, "breaker_failure_threshold"),
        ({"breaker_cooldown_s": -1}, "breaker_cooldown_s"),
        ({"extra_headers": {"Authorization": "Bearer x"}}, "extra_headers"),
        ({"extra_headers": {"host": "evil.example"}}, "extra_headers"),
        ({"extra_headers": {"Content-Length": "1"}}, "extra_headers"),
        ({"extra_headers": {"Bad Header": "x"}}, "extra_headers"),
        ({"extra_headers": {"X-Injected": "a\r\nHost: evil"}}, "extra_headers"),
        ({"extra_headers": {"X-New": "***"}}, "extra_headers"),
        ({"extra_headers": ["X-List"]}, "extra_headers"),
        ({"extra_headers": {"X-Object": {"a": 1}}}, "extra_headers"),
        ({"name": "not a slug!"}, "name"),
    ],
)
def test_invalid_upstream_is_refused_with_a_field_error(
    staff_client: APIClient, overrides: dict[str, Any], field: str
) -> None:
    response = staff_client.post(UPSTREAMS, _upstream_body(**overrides), format="json")

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid"
    assert _has_field_error(body, field), body
    assert SECRET not in response.content.decode()
    assert not Upstream.objects.exists()


def test_duplicate_upstream_name_is_a_field_error(staff_client: APIClient) -> None:
    UpstreamFactory(name="openai-main")
    response = staff_client.post(UPSTREAMS, _upstream_body(), format="json")
    assert response.status_code == 400
    assert "name" in response.json()["fields"]


def test_mock_upstream_needs_no_base_url_but_turning_it_openai_does(staff_client: APIClient) -> None:
    created = staff_client.post(UPSTREAMS, {"name": "demo", "kind": "mock"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["has_api_key"] is False

    response = staff_client.patch(f"{UPSTREAMS}{created.json()['id']}/", {"kind": "openai"}, format="json")

    assert response.status_code == 400
    assert "base_url" in response.json()["fields"]
    assert Upstream.objects.get(name="demo").kind == "mock"


# --- upstreams: delete ---------------------------------------------------------------------------


def test_unused_upstream_is_deleted(staff_client: APIClient) -> None:
    upstream = UpstreamFactory()
    assert staff_client.delete(f"{UPSTREAMS}{upstream.pk}/").status_code == 204
    assert not Upstream.objects.filter(pk=upstream.pk).exists()


def test_upstream_still_used_by_a_deployment_is_not_deleted(staff_client: APIClient) -> None:
    deployment = DeploymentFactory(model__name="gpt-4o")

    response = staff_client.delete(f"{UPSTREAMS}{deployment.upstream.pk}/")

    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "upstream_in_use"
    assert "gpt-4o" in body["detail"]
    assert Upstream.objects.filter(pk=deployment.upstream.pk).exists()
    assert not AuditEvent.objects.filter(action="upstream.delete").exists()


# --- upstreams: who may ---------------------------------------------------------------------------


def test_non_staff_cannot_read_or_write_upstreams(user_client: APIClient) -> None:
    upstream = UpstreamFactory()
    assert user_client.get(UPSTREAMS).status_code == 403
    assert user_client.get(f"{UPSTREAMS}{upstream.pk}/").status_code == 403
    assert user_client.post(UPSTREAMS, _upstream_body(), format="json").status_code == 403
    assert user_client.patch(f"{UPSTREAMS}{upstream.pk}/", {"timeout_s": 1}, format="json").status_code == 403
    assert user_client.delete(f"{UPSTREAMS}{upstream.pk}/").status_code == 403
    assert Upstream.objects.get(pk=upstream.pk).timeout_s == upstream.timeout_s


def test_staff_without_model_permissions_are_refused_upstreams_like_ordinary_users() -> None:
    upstream = UpstreamFactory()
    client = _client(UserFactory(staff=True))
    assert client.get(UPSTREAMS).status_code == 403
    assert client.get(f"{UPSTREAMS}{upstream.pk}/").status_code == 403
    assert client.options(UPSTREAMS).status_code == 403
    assert client.post(UPSTREAMS, _upstream_body(), format="json").status_code == 403
    assert client.patch(f"{UPSTREAMS}{upstream.pk}/", {"timeout_s": 1}, format="json").status_code == 403
    assert client.delete(f"{UPSTREAMS}{upstream.pk}/").status_code == 403
    assert Upstream.objects.get(pk=upstream.pk).timeout_s == upstream.timeout_s


def test_each_upstream_method_needs_its_own_model_permission() -> None:
    upstream = UpstreamFactory()
    url = f"{UPSTREAMS}{upstream.pk}/"
    viewer = _client(_staff_with("view_upstream"))
    assert viewer.get(UPSTREAMS).json()["count"] == 1
    assert viewer.get(url).status_code == 200
    assert viewer.post(UPSTREAMS, _upstream_body(), format="json").status_code == 403
    assert viewer.patch(url, {"timeout_s": 1}, format="json").status_code == 403
    assert viewer.delete(url).status_code == 403

    changer = _client(_staff_with("change_upstream"))  # change implies view, as in the admin
    assert changer.get(url).status_code == 200
    assert changer.patch(url, {"timeout_s": 7}, format="json").status_code == 200
    assert changer.delete(url).status_code == 403

    assert _client(_staff_with("add_upstream")).post(UPSTREAMS, _upstream_body(), format="json").status_code == 201
    assert _client(_staff_with("delete_upstream")).delete(url).status_code == 204


def test_a_superuser_needs_no_explicit_permission() -> None:
    client = _client(UserFactory(superuser=True))
    assert client.post(UPSTREAMS, _upstream_body(), format="json").status_code == 201
    assert client.get(UPSTREAMS).json()["count"] == 1


def test_anonymous_callers_are_told_to_authenticate() -> None:
    client = APIClient()
    assert client.get(UPSTREAMS).status_code == 401
    assert client.get(MODELS).status_code == 401


# --- upstreams: audit -----------------------------------------------------------------------------


def test_upstream_writes_are_audited_without_secrets(staff: User, staff_client: APIClient) -> None:
    created = staff_client.post(UPSTREAMS, _upstream_body(), format="json").json()
    url = f"{UPSTREAMS}{created['id']}/"
    staff_client.patch(url, {"timeout_s": 9, "api_key": "sk-second-secret"}, format="json")
    staff_client.patch(url, {"extra_headers": {"OpenAI-Organization": "other-secret-value"}}, format="json")
    staff_client.delete(url)

    events = list(AuditEvent.objects.filter(object_type="proxy.upstream").order_by("id"))
    assert [e.action for e in events] == ["upstream.create", "upstream.update", "upstream.update", "upstream.delete"]
    for event in events:
        assert event.actor_id == staff.pk
        assert event.ip_address == "127.0.0.1"
        assert event.object_id == str(created["id"])
        dumped = json.dumps(event.changes)
        for secret in (SECRET, "sk-second-secret", HEADER_SECRET, "other-secret-value"):
            assert secret not in dumped
    assert events[0].changes["api_key"] == "set"
    assert events[1].changes["timeout_s"] == [20.0, 9.0]
    assert events[1].changes["api_key"] == "changed"
    assert events[2].changes["extra_headers"] == "values changed"


def test_a_patch_that_changes_nothing_writes_no_audit_event(staff_client: APIClient) -> None:
    upstream = UpstreamFactory(api_key=SECRET, timeout_s=20.0)
    model = DeploymentFactory(model__name="same", upstream=upstream).model

    upstream_answer = staff_client.patch(
        f"{UPSTREAMS}{upstream.pk}/", {"timeout_s": 20, "api_key": SECRET, "extra_headers": {}}, format="json"
    )
    model_answer = staff_client.patch(f"{MODELS}{model.pk}/", {"name": "same", "is_active": True}, format="json")

    assert upstream_answer.status_code == 200
    assert model_answer.status_code == 200
    assert not AuditEvent.objects.exists()


# --- models: staff ---------------------------------------------------------------------------------


@pytest.fixture
def upstreams() -> tuple[Upstream, Upstream]:
    return UpstreamFactory(name="openai-a"), UpstreamFactory(name="mock-b", mock=True)


def _model_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "gpt-4o",
        "input_price_per_1k": "0.0025",
        "output_price_per_1k": "0.01",
        "deployments": [
            {"upstream": "openai-a", "upstream_model": "gpt-4o-2024-08-06", "weight": 3},
            {"upstream": "mock-b", "upstream_model": "echo", "weight": 1, "is_active": False},
        ],
    }
    body.update(overrides)
    return body


def test_staff_creates_a_model_with_deployments_and_fallbacks(
    staff_client: APIClient, upstreams: tuple[Upstream, Upstream]
) -> None:
    ModelFactory(name="gpt-4o-mini")

    response = staff_client.post(MODELS, _model_body(fallbacks=["gpt-4o-mini"]), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["name"] == "gpt-4o"
    assert body["fallbacks"] == ["gpt-4o-mini"]
    assert body["input_price_per_1k"] == "0.002500"
    assert body["output_price_per_1k"] == "0.010000"
    assert [(d["upstream"], d["upstream_model"], d["weight"], d["is_active"]) for d in body["deployments"]] == [
        ("openai-a", "gpt-4o-2024-08-06", 3, True),
        ("mock-b", "echo", 1, False),
    ]
    assert all(isinstance(d["id"], int) for d in body["deployments"])
    model = Model.objects.get(name="gpt-4o")
    assert model.input_price_per_1k == Decimal("0.0025")
    assert model.deployments.count() == 2
    event = AuditEvent.objects.get(action="model.create")
    assert event.changes["deployments"][0]["upstream"] == "openai-a"
    assert event.ip_address == "127.0.0.1"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"fallbacks": ["no-such-model"]}, "fallbacks"),
        ({"fallbacks": ["gpt-4o"]}, "fallbacks"),
        ({"fallbacks": "gpt-4o-mini"}, "fallbacks"),
        ({"input_price_per_1k": "-0.1"}, "input_price_per_1k"),
        ({"output_price_per_1k": "abc"}, "output_price_per_1k"),
        ({"deployments": []}, "deployments"),
        ({"deployments": None}, "deployments"),
        ({"deployments": [{"upstream": "nowhere", "upstream_model": "x"}]}, "deployments"),
        ({"deployments": [{"upstream": "openai-a", "upstream_model": "x", "weight": -1}]}, "deployments"),
        ({"deployments": [{"upstream": "openai-a", "upstream_model": ""}]}, "deployments"),
        (
            {
                "deployments": [
                    {"upstream": "openai-a", "upstream_model": "x"},
                    {"upstream": "openai-a", "upstream_model": "x"},
                ]
            },
            "deployments",
        ),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_model_is_refused_with_a_field_error(
    staff_client: APIClient, upstreams: tuple[Upstream, Upstream], overrides: dict[str, Any], field: str
) -> None:
    body = _model_body(**overrides)
    if overrides.get("deployments", "") is None:
        del body["deployments"]

    response = staff_client.post(MODELS, body, format="json")

    assert response.status_code == 400, response.content
    assert _has_field_error(response.json(), field), response.json()
    assert not Model.objects.filter(name="gpt-4o").exists()


def test_duplicate_model_name_is_a_field_error(staff_client: APIClient, upstreams: tuple[Upstream, Upstream]) -> None:
    ModelFactory(name="gpt-4o")
    response = staff_client.post(MODELS, _model_body(), format="json")
    assert response.status_code == 400
    assert "name" in response.json()["fields"]


def test_patching_deployments_replaces_them_and_keeps_ids_of_those_that_stay(
    staff_client: APIClient, upstreams: tuple[Upstream, Upstream]
) -> None:
    created = staff_client.post(MODELS, _model_body(), format="json").json()
    kept_id = created["deployments"][0]["id"]
    url = f"{MODELS}{created['id']}/"

    response = staff_client.patch(
        url,
        {
            "deployments": [
                {"upstream": "openai-a", "upstream_model": "gpt-4o-2024-08-06", "weight": 7},
                {"upstream": "openai-a", "upstream_model": "gpt-4o-2024-11-20"},
            ]
        },
        format="json",
    )

    assert response.status_code == 200, response.content
    rows = response.json()["deployments"]
    assert [(d["upstream"], d["upstream_model"], d["weight"]) for d in rows] == [
        ("openai-a", "gpt-4o-2024-08-06", 7),
        ("openai-a", "gpt-4o-2024-11-20", 1),
    ]
    assert rows[0]["id"] == kept_id
    assert not Deployment.objects.filter(upstream__name="mock-b").exists()

    untouched = staff_client.patch(url, {"output_price_per_1k": "0.02"}, format="json")
    assert untouched.status_code == 200
    assert [d["id"] for d in untouched.json()["deployments"]] == [d["id"] for d in rows]
    assert untouched.json()["output_price_per_1k"] == "0.020000"


def test_patch_fallback_to_itself_is_refused(staff_client: APIClient) -> None:
    model = DeploymentFactory(model__name="a").model
    response = staff_client.patch(f"{MODELS}{model.pk}/", {"fallbacks": ["a"]}, format="json")
    assert response.status_code == 400
    assert "fallbacks" in response.json()["fields"]


def test_renaming_a_model_renames_it_in_other_models_fallbacks(staff_client: APIClient) -> None:
    target = DeploymentFactory(model__name="small").model
    holder = DeploymentFactory(model__name="big", model__fallbacks=["small"]).model

    response = staff_client.patch(f"{MODELS}{target.pk}/", {"name": "small-v2"}, format="json")

    assert response.status_code == 200, response.content
    holder.refresh_from_db()
    assert holder.fallbacks == ["small-v2"]


def test_deleting_a_model_deletes_its_deployments_and_drops_it_from_fallbacks(staff_client: APIClient) -> None:
    target = DeploymentFactory(model__name="small").model
    holder = DeploymentFactory(model__name="big", model__fallbacks=["small"]).model

    assert staff_client.delete(f"{MODELS}{target.pk}/").status_code == 204

    assert not Model.objects.filter(pk=target.pk).exists()
    assert not Deployment.objects.filter(model_id=target.pk).exists()
    holder.refresh_from_db()
    assert holder.fallbacks == []
    event = AuditEvent.objects.get(action="model.delete")
    assert event.changes["fallback_removed_from"] == ["big"]


def test_model_list_query_count_does_not_grow_with_rows(staff_client: APIClient) -> None:
    for _ in range(2):
        DeploymentFactory.create_batch(2, model=ModelFactory())
    with CaptureQueriesContext(connection) as few:
        assert staff_client.get(MODELS).json()["count"] == 2
    for _ in range(6):
        DeploymentFactory.create_batch(3, model=ModelFactory())
    with CaptureQueriesContext(connection) as many:
        assert staff_client.get(MODELS).json()["count"] == 8
    assert len(many.captured_queries) == len(few.captured_queries)


def test_model_list_is_searchable_and_filterable(staff_client: APIClient) -> None:
    ModelFactory(name="gpt-4o")
    ModelFactory(name="llama3", is_active=False)
    assert [r["name"] for r in staff_client.get(MODELS, {"search": "llama"}).json()["results"]] == ["llama3"]
    assert [r["name"] for r in staff_client.get(MODELS, {"is_active": "true"}).json()["results"]] == ["gpt-4o"]


# --- models: non-staff ------------------------------------------------------------------------------


def test_non_staff_cannot_write_models(user_client: APIClient, upstreams: tuple[Upstream, Upstream]) -> None:
    model = DeploymentFactory(model__name="gpt-4o", upstream=upstreams[0]).model
    assert user_client.post(MODELS, _model_body(name="mine"), format="json").status_code == 403
    assert user_client.patch(f"{MODELS}{model.pk}/", {"is_active": False}, format="json").status_code == 403
    assert user_client.delete(f"{MODELS}{model.pk}/").status_code == 403
    assert Model.objects.get(pk=model.pk).is_active
    assert not Model.objects.filter(name="mine").exists()


def test_staff_without_model_permissions_cannot_write_models_and_read_them_like_users(
    upstreams: tuple[Upstream, Upstream],
) -> None:
    model = DeploymentFactory(model__name="gpt-4o", upstream=upstreams[0]).model
    client = _client(UserFactory(staff=True))
    assert client.post(MODELS, _model_body(name="mine"), format="json").status_code == 403
    assert client.patch(f"{MODELS}{model.pk}/", {"is_active": False}, format="json").status_code == 403
    assert client.delete(f"{MODELS}{model.pk}/").status_code == 403
    assert client.get(MODELS).json()["count"] == 0  # no key: no model, as for any user
    assert client.get(f"{MODELS}{model.pk}/").status_code == 404
    assert Model.objects.get(pk=model.pk).is_active


def test_a_staff_member_who_may_change_models_finds_and_changes_one_without_view_model(
    upstreams: tuple[Upstream, Upstream],
) -> None:
    model = DeploymentFactory(model__name="gpt-4o", upstream=upstreams[0], model__is_active=False).model
    client = _client(_staff_with("change_model"))
    response = client.patch(f"{MODELS}{model.pk}/", {"is_active": True}, format="json")
    assert response.status_code == 200
    assert response.json()["deployments"][0]["upstream"] == upstreams[0].name
    assert client.post(MODELS, _model_body(name="mine"), format="json").status_code == 403


def test_a_staff_member_who_may_only_add_models_gets_the_created_model_back(
    upstreams: tuple[Upstream, Upstream],
) -> None:
    response = _client(_staff_with("add_model")).post(MODELS, _model_body(name="mine"), format="json")
    assert response.status_code == 201
    assert response.json()["name"] == "mine"


@pytest.fixture
def three_models() -> None:
    for name in ("alpha", "beta", "gamma"):
        DeploymentFactory(model__name=name)
    DeploymentFactory(model__name="retired", model__is_active=False)


def _visible(client: APIClient) -> list[str]:
    response = client.get(MODELS)
    assert response.status_code == 200
    return [row["name"] for row in response.json()["results"]]


@pytest.mark.usefixtures("three_models")
@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        ((True, set()), ["alpha", "beta", "gamma"]),
        ((False, {"beta", "gamma", "retired", "unknown"}), ["beta", "gamma"]),
        ((False, set()), []),
    ],
)
def test_non_staff_see_the_active_models_their_key_scopes_allow(
    user: User,
    user_client: APIClient,
    monkeypatch: pytest.MonkeyPatch,
    scopes: tuple[bool, set[str]],
    expected: list[str],
) -> None:
    asked: list[int] = []

    def fake_scopes(*, user_id: int) -> tuple[bool, set[str]]:
        asked.append(user_id)
        return scopes

    monkeypatch.setattr(keys.selectors, "key_model_scopes_for_user", fake_scopes, raising=False)

    assert _visible(user_client) == expected
    assert asked == [user.pk]


@pytest.mark.usefixtures("three_models")
def test_non_staff_answers_omit_deployments_and_hidden_models_are_not_found(
    user_client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        keys.selectors, "key_model_scopes_for_user", lambda *, user_id: (False, {"alpha"}), raising=False
    )
    alpha, beta = Model.objects.get(name="alpha"), Model.objects.get(name="beta")

    row = user_client.get(MODELS).json()["results"][0]
    detail = user_client.get(f"{MODELS}{alpha.pk}/")

    assert set(row) == {
        "id",
        "name",
        "is_active",
        "input_price_per_1k",
        "output_price_per_1k",
        "created_at",
        "updated_at",
    }
    assert detail.status_code == 200
    assert detail.json() == row
    assert user_client.get(f"{MODELS}{beta.pk}/").status_code == 404


needs_keys = pytest.mark.skipif(
    key_create is None or not hasattr(keys.selectors, "key_model_scopes_for_user"),
    reason="needs keys.services.key_create and keys.selectors.key_model_scopes_for_user",
)


@needs_keys
@pytest.mark.usefixtures("three_models")
def test_model_visibility_follows_the_users_real_keys(user: User, user_client: APIClient) -> None:
    assert key_create is not None
    assert key_revoke is not None
    other = UserFactory()
    key_create(owner=other, name="someone else's", allowed_models=[])
    assert _visible(user_client) == []

    key_create(owner=user, name="disabled", allowed_models=[], is_active=False)
    scoped = key_create(owner=user, name="scoped", allowed_models=["alpha", "gamma"]).key
    assert _visible(user_client) == ["alpha", "gamma"]

    everything = key_create(owner=user, name="everything", allowed_models=[]).key
    assert _visible(user_client) == ["alpha", "beta", "gamma"]

    key_revoke(key=everything)
    key_revoke(key=scoped)
    assert _visible(user_client) == []


def test_staff_see_every_model_with_deployments(staff_client: APIClient) -> None:
    DeploymentFactory(model__name="retired", model__is_active=False, upstream__name="up-1")
    rows = staff_client.get(MODELS).json()["results"]
    assert [row["name"] for row in rows] == ["retired"]
    assert rows[0]["deployments"][0]["upstream"] == "up-1"


# --- schema -------------------------------------------------------------------------------------------


def test_schema_documents_both_endpoints_with_a_write_only_api_key(staff_client: APIClient) -> None:
    response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = json.loads(response.content)
    paths = schema["paths"]
    assert {"get", "post"} <= set(paths["/api/upstreams/"])
    assert {"get", "patch", "delete"} <= set(paths["/api/upstreams/{id}/"])
    assert "put" not in paths["/api/upstreams/{id}/"]
    assert "409" in paths["/api/upstreams/{id}/"]["delete"]["responses"]
    assert {"get", "post"} <= set(paths["/api/models/"])
    components = schema["components"]["schemas"]
    assert "api_key" in components["UpstreamRequest"]["properties"]
    assert "api_key" not in components["Upstream"]["properties"]
    assert "has_api_key" in components["Upstream"]["properties"]
    assert "api_key" in components["PatchedUpstreamRequest"]["properties"]
    assert "deployments" in components["ModelRequest"]["properties"]


def test_crossed_renames_of_two_models_naming_each_other_both_reach_the_fallbacks(staff_client: APIClient) -> None:
    first = DeploymentFactory(model__name="a", model__fallbacks=["b"]).model
    second = DeploymentFactory(model__name="b", model__fallbacks=["a"]).model

    assert staff_client.patch(f"{MODELS}{first.pk}/", {"name": "a2"}, format="json").status_code == 200
    assert staff_client.patch(f"{MODELS}{second.pk}/", {"name": "b2"}, format="json").status_code == 200

    assert dict(Model.objects.values_list("name", "fallbacks")) == {"a2": ["b2"], "b2": ["a2"]}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks are PostgreSQL's (SQLite locks the file)")
def test_a_rename_locks_the_model_and_the_models_naming_it_in_one_query_in_key_order(
    staff_client: APIClient,
) -> None:
    target = DeploymentFactory(model__name="small").model
    DeploymentFactory(model__name="big", model__fallbacks=["small"])

    with CaptureQueriesContext(connection) as context:
        response = staff_client.patch(f"{MODELS}{target.pk}/", {"name": "small-v2"}, format="json")

    assert response.status_code == 200, response.content
    model_locks = [
        q["sql"] for q in context.captured_queries if "FOR UPDATE" in q["sql"] and '"proxy_model"' in q["sql"]
    ]
    assert len(model_locks) == 1
    assert 'ORDER BY "proxy_model"."id" ASC' in model_locks[0]
