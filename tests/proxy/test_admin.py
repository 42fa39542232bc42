"""Django admin for upstreams and models: secrets stay hidden, writes are audited, pages do not N+1."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from gateway_stats.models import AuditEvent
from proxy.models import Deployment, Model, Upstream
from tests.factories import UserFactory
from tests.proxy.factories import DeploymentFactory, ModelFactory, UpstreamFactory

pytestmark = pytest.mark.django_db

SECRET = "sk-admin-VERY-secret-987654321"
HEADER_SECRET = "header-secret-value-77"
UPSTREAM_LIST = "/admin/proxy/upstream/"
UPSTREAM_ADD = "/admin/proxy/upstream/add/"
MODEL_LIST = "/admin/proxy/model/"
MODEL_ADD = "/admin/proxy/model/add/"


@pytest.fixture
def admin_user() -> User:
    return UserFactory(superuser=True)


@pytest.fixture
def admin_client(admin_user: User) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def _queries(action: Callable[[], Any]) -> int:
    with CaptureQueriesContext(connection) as context:
        action()
    return len(context.captured_queries)


def _get_ok(client: Client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


def _upstream_form(**overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": "openai-main",
        "kind": "openai",
        "base_url": "https://api.openai.example/v1",
        "is_active": "on",
        "api_key": "",
        "extra_headers": "{}",
        "timeout_s": "30",
        "max_retries": "2",
        "breaker_failure_threshold": "5",
        "breaker_cooldown_s": "30",
    }
    form.update(overrides)
    return form


# --- upstreams ------------------------------------------------------------------------------------


def test_upstream_changelist_renders_without_secrets_and_without_n_plus_one(admin_client: Client) -> None:
    UpstreamFactory(api_key=SECRET, extra_headers={"X-Org": HEADER_SECRET})
    few = _queries(lambda: _get_ok(admin_client, UPSTREAM_LIST))
    UpstreamFactory.create_batch(6, api_key=SECRET)
    html = ""

    def render() -> None:
        nonlocal html
        html = _get_ok(admin_client, UPSTREAM_LIST)

    many = _queries(render)

    assert many == few
    assert SECRET not in html
    assert HEADER_SECRET not in html
    for upstream in Upstream.objects.all():
        assert upstream.api_key_encrypted not in html


def test_upstream_change_page_never_shows_the_key_nor_header_values(admin_client: Client) -> None:
    upstream = UpstreamFactory(api_key=SECRET, extra_headers={"X-Org": HEADER_SECRET})

    html = _get_ok(admin_client, f"{UPSTREAM_LIST}{upstream.pk}/change/")

    assert SECRET not in html
    assert upstream.api_key_encrypted not in html
    assert HEADER_SECRET not in html
    assert "X-Org" in html
    assert 'type="password"' in html
    assert "An API key is stored." in html
    assert "clear_api_key" in html


def test_upstream_and_model_add_pages_render(admin_client: Client) -> None:
    UpstreamFactory.create_batch(3)
    assert 'name="api_key"' in _get_ok(admin_client, UPSTREAM_ADD)
    assert "deployments-TOTAL_FORMS" in _get_ok(admin_client, MODEL_ADD)
    assert _queries(lambda: _get_ok(admin_client, UPSTREAM_ADD)) <= 6


def test_adding_an_upstream_in_the_admin_encrypts_the_key_and_audits_it(admin_client: Client, admin_user: User) -> None:
    response = admin_client.post(UPSTREAM_ADD, _upstream_form(api_key=SECRET))

    assert response.status_code == 302, response.content[:2000]
    upstream = Upstream.objects.get(name="openai-main")
    assert upstream.api_key == SECRET
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key_encrypted FROM proxy_upstream WHERE id = %s", [upstream.pk])
        (stored,) = cursor.fetchone()
    assert SECRET not in stored
    event = AuditEvent.objects.get(action="upstream.create")
    assert event.actor_id == admin_user.pk
    assert event.ip_address == "127.0.0.1"
    assert SECRET not in json.dumps(event.changes)


def test_admin_keeps_the_key_when_left_empty_replaces_it_when_typed_and_clears_it_on_request(
    admin_client: Client,
) -> None:
    upstream = UpstreamFactory(name="openai-main", api_key=SECRET, extra_headers={"X-Org": HEADER_SECRET})
    url = f"{UPSTREAM_LIST}{upstream.pk}/change/"
    masked = json.dumps({"X-Org": "***"})

    assert admin_client.post(url, _upstream_form(timeout_s="12", extra_headers=masked)).status_code == 302
    upstream.refresh_from_db()
    assert upstream.api_key == SECRET
    assert upstream.timeout_s == 12
    assert upstream.extra_headers == {"X-Org": HEADER_SECRET}

    assert admin_client.post(url, _upstream_form(api_key="sk-replacement", extra_headers=masked)).status_code == 302
    upstream.refresh_from_db()
    assert upstream.api_key == "sk-replacement"

    assert admin_client.post(url, _upstream_form(clear_api_key="on", extra_headers=masked)).status_code == 302
    upstream.refresh_from_db()
    assert upstream.api_key_encrypted == ""
    assert not upstream.has_api_key

    actions = list(AuditEvent.objects.filter(object_type="proxy.upstream").values_list("action", flat=True))
    assert actions.count("upstream.update") == 3
    for changes in AuditEvent.objects.values_list("changes", flat=True):
        dumped = json.dumps(changes)
        assert SECRET not in dumped
        assert "sk-replacement" not in dumped
        assert HEADER_SECRET not in dumped


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"base_url": ""}, "base_url"),
        ({"max_retries": "11"}, "max_retries"),
        ({"timeout_s": "0"}, "timeout_s"),
        ({"extra_headers": json.dumps({"Authorization": "Bearer x"})}, "extra_headers"),
        ({"api_key": "sk-x", "clear_api_key": "on"}, "clear_api_key"),
    ],
)
def test_admin_upstream_form_shows_field_errors(admin_client: Client, overrides: dict[str, Any], field: str) -> None:
    response = admin_client.post(UPSTREAM_ADD, _upstream_form(**overrides))

    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not Upstream.objects.exists()


def test_admin_refuses_to_delete_an_upstream_in_use(admin_client: Client) -> None:
    deployment = DeploymentFactory()
    url = f"{UPSTREAM_LIST}{deployment.upstream.pk}/delete/"

    page = admin_client.get(url)
    posted = admin_client.post(url, {"post": "yes"})

    assert page.status_code == 200
    assert posted.status_code in {200, 403}
    assert Upstream.objects.filter(pk=deployment.upstream.pk).exists()


def test_admin_deletes_an_unused_upstream_through_the_service(admin_client: Client) -> None:
    upstream = UpstreamFactory()
    response = admin_client.post(f"{UPSTREAM_LIST}{upstream.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Upstream.objects.filter(pk=upstream.pk).exists()
    assert AuditEvent.objects.filter(action="upstream.delete", object_id=str(upstream.pk)).exists()


# --- models -----------------------------------------------------------------------------------------


def test_model_changelist_counts_deployments_without_n_plus_one(admin_client: Client) -> None:
    DeploymentFactory.create_batch(2, model=ModelFactory(name="first"))
    few = _queries(lambda: _get_ok(admin_client, MODEL_LIST))
    for _ in range(6):
        DeploymentFactory.create_batch(3, model=ModelFactory())

    html = ""

    def render() -> None:
        nonlocal html
        html = _get_ok(admin_client, MODEL_LIST)

    many = _queries(render)

    assert many == few
    assert "first" in html


def test_model_changelist_filtered_by_upstream_counts_each_deployment_once(admin_client: Client) -> None:
    upstream = UpstreamFactory(name="shared")
    model = ModelFactory(name="multi")
    DeploymentFactory.create_batch(2, model=model, upstream=upstream)
    DeploymentFactory(model=model)
    DeploymentFactory(model__name="elsewhere")

    response = admin_client.get(MODEL_LIST, {"deployments__upstream__id__exact": upstream.pk})

    assert response.status_code == 200
    rows = list(response.context["cl"].result_list)
    assert [(row.name, row.deployment_count) for row in rows] == [("multi", 3)]


def test_model_change_page_with_inline_deployments_does_not_n_plus_one(admin_client: Client) -> None:
    UpstreamFactory.create_batch(4)
    small = ModelFactory()
    DeploymentFactory(model=small)
    big = ModelFactory()
    DeploymentFactory.create_batch(6, model=big)

    few = _queries(lambda: _get_ok(admin_client, f"{MODEL_LIST}{small.pk}/change/"))
    many = _queries(lambda: _get_ok(admin_client, f"{MODEL_LIST}{big.pk}/change/"))

    assert many == few


def _model_form(upstream: Upstream, **overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": "gpt-4o",
        "is_active": "on",
        "input_price_per_1k": "0.0025",
        "output_price_per_1k": "0.01",
        "output_tokens_estimate": "256",
        "deployments-TOTAL_FORMS": "1",
        "deployments-INITIAL_FORMS": "0",
        "deployments-MIN_NUM_FORMS": "1",
        "deployments-MAX_NUM_FORMS": "1000",
        "deployments-0-upstream": str(upstream.pk),
        "deployments-0-upstream_model": "gpt-4o-2024-08-06",
        "deployments-0-weight": "2",
        "deployments-0-is_active": "on",
    }
    form.update(overrides)
    return form


def test_adding_a_model_with_an_inline_deployment_in_the_admin(admin_client: Client, admin_user: User) -> None:
    upstream = UpstreamFactory()

    response = admin_client.post(MODEL_ADD, _model_form(upstream))

    assert response.status_code == 302, response.content[:3000]
    model = Model.objects.get(name="gpt-4o")
    assert model.input_price_per_1k == Decimal("0.0025")
    deployment = Deployment.objects.get(model=model)
    assert (deployment.upstream_id, deployment.upstream_model, deployment.weight) == (
        upstream.pk,
        "gpt-4o-2024-08-06",
        2,
    )
    actions = set(AuditEvent.objects.filter(object_type="proxy.model").values_list("action", flat=True))
    assert actions == {"model.create", "model.deployments_update"}
    assert AuditEvent.objects.filter(actor=admin_user, object_type="proxy.model").count() == 2


@pytest.mark.parametrize("fallbacks", [["gpt-4o"], ["no-such-model"], ["other", "other"]])
def test_admin_model_form_refuses_bad_fallbacks(admin_client: Client, fallbacks: Any) -> None:
    upstream = UpstreamFactory()
    ModelFactory(name="other")
    ModelFactory(name="spare")
    places = {f"fallbacks_{index}": name for index, name in enumerate(fallbacks)}  # one drop-down per place

    response = admin_client.post(MODEL_ADD, _model_form(upstream, **places))

    assert response.status_code == 200
    assert "fallbacks" in response.context["adminform"].form.errors
    assert not Model.objects.filter(name="gpt-4o").exists()


def test_admin_rename_is_carried_into_fallbacks(admin_client: Client) -> None:
    deployment = DeploymentFactory(model__name="small")
    holder = ModelFactory(name="big", fallbacks=["small"])
    form = _model_form(
        deployment.upstream,
        name="small-v2",
        **{
            "deployments-INITIAL_FORMS": "1",
            "deployments-0-id": str(deployment.pk),
            "deployments-0-model": str(deployment.model_id),
            "deployments-0-upstream_model": deployment.upstream_model,
            "deployments-0-weight": "1",
        },
    )

    response = admin_client.post(f"{MODEL_LIST}{deployment.model_id}/change/", form)

    assert response.status_code == 302, response.content[:3000]
    holder.refresh_from_db()
    assert holder.fallbacks == ["small-v2"]
    assert Model.objects.filter(name="small-v2").exists()


def _inline_rows(model: Model, rows: list[tuple[Upstream, str]], *, initial: int) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": model.name,
        "is_active": "on",
        **{f"fallbacks_{index}": name for index, name in enumerate(model.fallbacks)},
        "input_price_per_1k": str(model.input_price_per_1k),
        "output_price_per_1k": str(model.output_price_per_1k),
        "output_tokens_estimate": str(model.output_tokens_estimate),
        "deployments-TOTAL_FORMS": str(len(rows)),
        "deployments-INITIAL_FORMS": str(initial),
        "deployments-MIN_NUM_FORMS": "1",
        "deployments-MAX_NUM_FORMS": "1000",
    }
    existing = list(model.deployments.order_by("pk"))
    for index, (upstream, upstream_model) in enumerate(rows):
        if index < initial:
            form[f"deployments-{index}-id"] = str(existing[index].pk)
            form[f"deployments-{index}-model"] = str(model.pk)
        form[f"deployments-{index}-upstream"] = str(upstream.pk)
        form[f"deployments-{index}-upstream_model"] = upstream_model
        form[f"deployments-{index}-weight"] = "1"
        form[f"deployments-{index}-is_active"] = "on"
    return form


def test_inline_deployments_are_saved_by_the_service_and_reach_the_catalog_at_once(
    admin_client: Client, admin_user: User
) -> None:
    from proxy.catalog import catalog_get

    deployment = DeploymentFactory(model__name="m")
    model, other = deployment.model, UpstreamFactory()
    assert len(catalog_get().models["m"].deployments) == 1  # this worker holds the catalog in memory
    rows = [(deployment.upstream, deployment.upstream_model), (other, "second")]

    response = admin_client.post(f"{MODEL_LIST}{model.pk}/change/", _inline_rows(model, rows, initial=1))

    assert response.status_code == 302, response.content[:3000]
    assert len(catalog_get().models["m"].deployments) == 2
    event = AuditEvent.objects.get(action="model.deployments_update")
    assert event.actor == admin_user
    assert [row["upstream_model"] for row in event.changes["deployments"]] == [deployment.upstream_model, "second"]


def test_the_same_inline_deployment_twice_is_a_form_error_and_saves_nothing(admin_client: Client) -> None:
    deployment = DeploymentFactory(model__name="m")
    rows = [(deployment.upstream, "dup"), (deployment.upstream, "dup")]

    response = admin_client.post(
        f"{MODEL_LIST}{deployment.model_id}/change/", _inline_rows(deployment.model, rows, initial=1)
    )

    assert response.status_code == 200
    assert list(Deployment.objects.values_list("upstream_model", flat=True)) == [deployment.upstream_model]
    assert not AuditEvent.objects.filter(action="model.deployments_update").exists()
