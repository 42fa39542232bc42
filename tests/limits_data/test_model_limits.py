"""A model's caps (rpm_limit, tpm_limit across all keys) and its output_tokens_estimate: stored with database
checks, written through the models API and the admin with validation, and carried by the routing catalog."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.test import Client

from accounts.models import User
from proxy.catalog import catalog_get, catalog_load
from proxy.models import Model
from tests.factories import UserFactory
from tests.proxy.factories import DeploymentFactory, ModelFactory, UpstreamFactory

pytestmark = pytest.mark.django_db

MODELS = "/api/models/"
LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "output_tokens_estimate")


@pytest.fixture
def staff_api(client_for: Any, staff: User) -> Any:
    return client_for(staff)


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "capped",
        "deployments": [{"upstream": "openai-a", "upstream_model": "gpt-4o-2024-08-06"}],
    }
    body.update(overrides)
    return body


@pytest.fixture
def upstream() -> Any:
    return UpstreamFactory(name="openai-a")


# --- storage and the catalog -------------------------------------------------------------------------
def test_a_model_has_no_caps_and_a_256_token_output_estimate_by_default() -> None:
    model = ModelFactory()
    model.refresh_from_db()

    assert (model.rpm_limit, model.tpm_limit, model.output_tokens_estimate) == (None, None, 256)


@pytest.mark.parametrize("fields", [{"output_tokens_estimate": 0}, {"rpm_limit": -1}, {"tpm_limit": -5}])
def test_the_database_refuses_a_zero_estimate_and_negative_caps(fields: dict[str, Any]) -> None:
    model = ModelFactory()

    with pytest.raises(IntegrityError), transaction.atomic():
        Model.objects.filter(pk=model.pk).update(**fields)


def test_the_catalog_carries_each_models_caps_and_output_estimate() -> None:
    capped = DeploymentFactory(model__name="capped", model__rpm_limit=600, model__tpm_limit=90_000).model
    Model.objects.filter(pk=capped.pk).update(output_tokens_estimate=64)
    DeploymentFactory(model__name="plain")

    models = catalog_load().models

    assert (models["capped"].rpm_limit, models["capped"].tpm_limit, models["capped"].output_tokens_estimate) == (
        600,
        90_000,
        64,
    )
    assert (models["plain"].rpm_limit, models["plain"].tpm_limit, models["plain"].output_tokens_estimate) == (
        None,
        None,
        256,
    )


# --- the models API ------------------------------------------------------------------------------------
def test_staff_set_change_and_clear_a_models_caps_through_the_api_and_the_catalog_follows(
    staff_api: Any, upstream: Any, run_on_commit: Any
) -> None:
    with run_on_commit():
        created = staff_api.post(
            MODELS, _body(rpm_limit=100, tpm_limit=20_000, output_tokens_estimate=512), format="json"
        )
    assert created.status_code == 201, created.content
    assert {field: created.json()[field] for field in LIMIT_FIELDS} == {
        "rpm_limit": 100,
        "tpm_limit": 20_000,
        "output_tokens_estimate": 512,
    }
    target = catalog_get().models["capped"]
    assert (target.rpm_limit, target.tpm_limit, target.output_tokens_estimate) == (100, 20_000, 512)

    with run_on_commit():
        changed = staff_api.patch(
            f"{MODELS}{created.json()['id']}/", {"rpm_limit": None, "tpm_limit": 1}, format="json"
        )
    assert changed.status_code == 200, changed.content
    assert {field: changed.json()[field] for field in LIMIT_FIELDS} == {
        "rpm_limit": None,
        "tpm_limit": 1,
        "output_tokens_estimate": 512,
    }
    target = catalog_get().models["capped"]
    assert (target.rpm_limit, target.tpm_limit, target.output_tokens_estimate) == (None, 1, 512)


def test_a_model_created_without_the_fields_gets_the_defaults(staff_api: Any, upstream: Any) -> None:
    created = staff_api.post(MODELS, _body(), format="json")

    assert created.status_code == 201, created.content
    assert {field: created.json()[field] for field in LIMIT_FIELDS} == {
        "rpm_limit": None,
        "tpm_limit": None,
        "output_tokens_estimate": 256,
    }


BAD_VALUES = [-1, 0, 1.5, "ten", "", True, [5], {"n": 5}, 2**31, 10**30]


@pytest.mark.parametrize("field", LIMIT_FIELDS)
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_a_bad_cap_or_estimate_is_a_400_naming_the_field(staff_api: Any, upstream: Any, field: str, value: Any) -> None:
    created = staff_api.post(MODELS, _body(**{field: value}), format="json")
    model = ModelFactory(name="existing")
    changed = staff_api.patch(f"{MODELS}{model.pk}/", {field: value}, format="json")

    for answer in (created, changed):
        assert answer.status_code == 400, answer.content
        assert list(answer.json()["fields"]) == [field]
    assert not Model.objects.filter(name="capped").exists()
    model.refresh_from_db()
    assert (model.rpm_limit, model.tpm_limit, model.output_tokens_estimate) == (None, None, 256)


def test_the_output_estimate_cannot_be_cleared(staff_api: Any) -> None:
    model = ModelFactory()

    answer = staff_api.patch(f"{MODELS}{model.pk}/", {"output_tokens_estimate": None}, format="json")

    assert answer.status_code == 400
    assert list(answer.json()["fields"]) == ["output_tokens_estimate"]


def test_users_who_are_not_staff_do_not_see_the_caps(client_for: Any) -> None:
    from tests.factories import ApiKeyFactory

    owner = UserFactory()
    ApiKeyFactory(owner=owner)
    DeploymentFactory(model__name="capped", model__rpm_limit=5)

    rows = client_for(owner).get(MODELS).json()["results"]

    assert [row["name"] for row in rows] == ["capped"]
    assert not set(LIMIT_FIELDS) & set(rows[0])


def test_the_schema_documents_the_caps(staff_api: Any) -> None:
    schema = staff_api.get("/api/schema/", {"format": "json"}).json()
    properties = schema["components"]["schemas"]["Model"]["properties"]

    for field in LIMIT_FIELDS:
        assert properties[field]["type"] == "integer"
        assert properties[field]["minimum"] == 1
        assert properties[field]["description"]
    assert properties["rpm_limit"]["nullable"] is True
    assert "nullable" not in properties["output_tokens_estimate"]


# --- the admin -------------------------------------------------------------------------------------------
def _admin_form(model: Model, **overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": model.name,
        "is_active": "on",
        "fallbacks": "[]",
        "input_price_per_1k": str(model.input_price_per_1k),
        "output_price_per_1k": str(model.output_price_per_1k),
        "rpm_limit": "",
        "tpm_limit": "",
        "output_tokens_estimate": "256",
        "deployments-TOTAL_FORMS": "0",
        "deployments-INITIAL_FORMS": "0",
        "deployments-MIN_NUM_FORMS": "1",
        "deployments-MAX_NUM_FORMS": "1000",
    }
    existing = list(model.deployments.order_by("pk"))
    form["deployments-TOTAL_FORMS"] = form["deployments-INITIAL_FORMS"] = str(len(existing))
    for index, deployment in enumerate(existing):
        form[f"deployments-{index}-id"] = str(deployment.pk)
        form[f"deployments-{index}-model"] = str(model.pk)
        form[f"deployments-{index}-upstream"] = str(deployment.upstream_id)
        form[f"deployments-{index}-upstream_model"] = deployment.upstream_model
        form[f"deployments-{index}-weight"] = str(deployment.weight)
        form[f"deployments-{index}-is_active"] = "on"
    form.update(overrides)
    return form


def test_the_model_admin_shows_a_limits_fieldset(admin_client_: Client) -> None:
    model = DeploymentFactory().model

    page = admin_client_.get(f"/admin/proxy/model/{model.pk}/change/")

    assert page.status_code == 200
    fieldsets = dict(page.context["adminform"].fieldsets)
    assert list(fieldsets["Limits"]["fields"]) == list(LIMIT_FIELDS)
    assert "upstream account's own quota" in fieldsets["Limits"]["description"]


def test_caps_set_in_the_model_admin_reach_the_catalog(admin_client_: Client, run_on_commit: Any) -> None:
    model = DeploymentFactory(model__name="capped").model

    with run_on_commit():
        answer = admin_client_.post(
            f"/admin/proxy/model/{model.pk}/change/",
            _admin_form(model, rpm_limit="30", tpm_limit="4000", output_tokens_estimate="128"),
        )

    assert answer.status_code == 302, answer.content[:3000]
    target = catalog_get().models["capped"]
    assert (target.rpm_limit, target.tpm_limit, target.output_tokens_estimate) == (30, 4000, 128)


@pytest.mark.parametrize(
    ("field", "value"),
    [("rpm_limit", "0"), ("tpm_limit", "-3"), ("output_tokens_estimate", "0"), ("output_tokens_estimate", "")],
)
def test_the_model_admin_refuses_bad_caps(admin_client_: Client, field: str, value: str) -> None:
    model = DeploymentFactory().model

    answer = admin_client_.post(f"/admin/proxy/model/{model.pk}/change/", _admin_form(model, **{field: value}))

    assert answer.status_code == 200
    assert field in answer.context["adminform"].form.errors
