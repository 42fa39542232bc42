"""The keys management API over HTTP with JWT: issue once, list, filter, scope, change, revoke, rotate."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.utils import timezone

from gateway_stats.models import AuditEvent
from keys.exceptions import KeyRefused
from keys.models import ApiKey
from keys.verification import key_verify
from tests.factories import ApiKeyFactory, UserFactory

pytestmark = pytest.mark.django_db

URL = "/api/keys/"


def _detail(key_id: int) -> str:
    return f"{URL}{key_id}/"


def _staff_with(*codenames: str) -> Any:
    """A staff member (not a superuser) holding exactly these ``keys`` permissions."""
    staff = UserFactory(staff=True)
    staff.user_permissions.set(Permission.objects.filter(content_type__app_label="keys", codename__in=codenames))
    return staff


def _raw_row(key_id: int) -> tuple[Any, ...]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM keys_apikey WHERE id = %s", [key_id])
        return cursor.fetchone()


def test_create_returns_the_secret_once_and_stores_only_its_digest(api, user, public_models):
    answer = api.post(URL, {"name": "ci", "allowed_models": ["gpt-4o"], "rpm_limit": 60}, format="json")

    assert answer.status_code == 201, answer.content
    body = answer.json()
    secret = body["key"]
    assert secret.startswith("afk-")
    assert len(secret) >= 4 + 27
    assert body["prefix"] == secret[:12]
    assert body["owner"] == user.pk
    assert body["allowed_models"] == ["gpt-4o"]
    assert "digest" not in body

    random_part = secret[4:]
    row = _raw_row(body["id"])
    assert not any(isinstance(value, str) and random_part in value for value in row)
    for answer in (api.get(URL), api.get(_detail(body["id"]))):
        assert answer.status_code == 200
        assert random_part not in answer.content.decode()
        assert "key" not in (answer.json()["results"][0] if "results" in answer.json() else answer.json())
    assert random_part not in str(list(AuditEvent.objects.values()))

    assert key_verify(secret, "198.51.100.7").key_id == body["id"]


def test_create_is_audited_with_actor_and_ip(api, user):
    body = api.post(URL, {"name": "ci"}, format="json").json()

    event = AuditEvent.objects.get(action="key.create")
    assert (event.actor, event.object_id, event.ip_address) == (user, str(body["id"]), "198.51.100.7")
    assert event.changes["name"] == "ci"


def test_the_audited_ip_is_the_servers_client_address_never_a_forwarded_for_header(api):
    # Only the ASGI server may believe X-Forwarded-For (FORWARDED_ALLOW_IPS); by then it is REMOTE_ADDR.
    api.post(URL, {"name": "ci"}, format="json", HTTP_X_FORWARDED_FOR="203.0.113.9")

    assert AuditEvent.objects.get(action="key.create").ip_address == "198.51.100.7"


def test_list_is_paginated(api, user):
    ApiKeyFactory.create_batch(25, owner=user)

    first = api.get(URL).json()
    second = api.get(first["next"]).json()

    assert set(first) == {"count", "next", "previous", "results"}
    assert (first["count"], len(first["results"]), len(second["results"])) == (25, 20, 5)
    assert second["next"] is None
    assert second["previous"] is not None
    assert {k["id"] for k in first["results"]}.isdisjoint({k["id"] for k in second["results"]})


def test_list_filters_by_is_active_and_revoked(api, user):
    active = ApiKeyFactory(owner=user)
    disabled = ApiKeyFactory(owner=user, is_active=False)
    revoked = ApiKeyFactory(owner=user, is_active=False, revoked_at=timezone.now())

    def ids(query: str) -> set[int]:
        return {k["id"] for k in api.get(f"{URL}?{query}").json()["results"]}

    assert ids("is_active=true") == {active.pk}
    assert ids("is_active=false") == {disabled.pk, revoked.pk}
    assert ids("revoked=true") == {revoked.pk}
    assert ids("revoked=false") == {active.pk, disabled.pk}


def test_list_searches_name_and_prefix(api, user):
    prod = ApiKeyFactory(owner=user, name="production backend")
    ApiKeyFactory(owner=user, name="staging")

    assert [k["id"] for k in api.get(f"{URL}?search=production").json()["results"]] == [prod.pk]
    assert [k["id"] for k in api.get(f"{URL}?search={prod.prefix}").json()["results"]] == [prod.pk]


def test_list_orders_by_created_at_and_last_used_at(api, user):
    now = timezone.now()
    old = ApiKeyFactory(owner=user, last_used_at=now)
    new = ApiKeyFactory(owner=user, last_used_at=now - timedelta(hours=1))
    ApiKey.objects.filter(pk=old.pk).update(created_at=now - timedelta(days=1))

    def order(ordering: str) -> list[int]:
        return [k["id"] for k in api.get(f"{URL}?ordering={ordering}").json()["results"]]

    assert order("created_at") == [old.pk, new.pk]
    assert order("-created_at") == [new.pk, old.pk]
    assert order("last_used_at") == [new.pk, old.pk]
    assert [k["id"] for k in api.get(URL).json()["results"]] == [new.pk, old.pk]  # newest first by default


def test_list_query_count_does_not_grow_with_the_number_of_keys(api, user, django_assert_max_num_queries):
    ApiKeyFactory.create_batch(20, owner=user)
    # JWT user lookup, COUNT, page, the page's budget spend (one query for all its keys).
    with django_assert_max_num_queries(4):
        answer = api.get(URL)
    assert len(answer.json()["results"]) == 20


def test_staff_list_query_count_is_bounded_too(client_for, staff, django_assert_max_num_queries):
    for owner in UserFactory.create_batch(5):
        ApiKeyFactory.create_batch(4, owner=owner)
    api = client_for(staff)
    with django_assert_max_num_queries(4):
        answer = api.get(URL)
    assert answer.json()["count"] == 20


def test_another_users_key_answers_404(api, other_user):
    theirs = ApiKeyFactory(owner=other_user)

    assert api.get(_detail(theirs.pk)).status_code == 404
    assert api.patch(_detail(theirs.pk), {"name": "mine"}, format="json").status_code == 404
    assert api.delete(_detail(theirs.pk)).status_code == 404
    assert api.post(f"{_detail(theirs.pk)}rotate/", {}, format="json").status_code == 404
    assert api.get(URL).json()["count"] == 0
    theirs.refresh_from_db()
    assert (theirs.name, theirs.is_active, theirs.digest) != ("mine", False, "")
    assert theirs.revoked_at is None


def test_staff_see_every_key_and_filter_by_owner(client_for, staff, user, other_user):
    mine = ApiKeyFactory(owner=user)
    theirs = ApiKeyFactory(owner=other_user)
    api = client_for(staff)

    assert {k["id"] for k in api.get(URL).json()["results"]} == {mine.pk, theirs.pk}
    assert [k["id"] for k in api.get(f"{URL}?owner={other_user.pk}").json()["results"]] == [theirs.pk]
    assert api.get(_detail(mine.pk)).status_code == 200


def test_staff_without_view_apikey_see_only_their_own_keys(client_for, user):
    theirs = ApiKeyFactory(owner=user)
    staff = UserFactory(staff=True)
    own = ApiKeyFactory(owner=staff)
    api = client_for(staff)

    assert [k["id"] for k in api.get(URL).json()["results"]] == [own.pk]
    assert api.get(f"{URL}?owner={user.pk}").json()["count"] == 0
    assert api.get(_detail(theirs.pk)).status_code == 404
    assert api.patch(_detail(theirs.pk), {"name": "taken"}, format="json").status_code == 404
    assert api.post(f"{_detail(theirs.pk)}rotate/", {}, format="json").status_code == 404
    assert api.delete(_detail(theirs.pk)).status_code == 404
    assert api.patch(_detail(own.pk), {"name": "still mine"}, format="json").status_code == 200
    theirs.refresh_from_db()
    assert theirs.name != "taken"
    assert theirs.revoked_at is None


def test_staff_with_view_apikey_see_every_key_but_cannot_change_rotate_or_revoke_others(client_for, user):
    theirs = ApiKeyFactory(owner=user)
    api = client_for(_staff_with("view_apikey"))

    assert [k["id"] for k in api.get(URL).json()["results"]] == [theirs.pk]
    assert api.get(_detail(theirs.pk)).status_code == 200
    assert api.patch(_detail(theirs.pk), {"name": "taken"}, format="json").status_code == 403
    assert api.post(f"{_detail(theirs.pk)}rotate/", {}, format="json").status_code == 403
    assert api.delete(_detail(theirs.pk)).status_code == 403
    theirs.refresh_from_db()
    assert theirs.name != "taken"
    assert theirs.revoked_at is None
    assert not AuditEvent.objects.filter(action__in=["key.rotate", "key.update", "key.revoke"]).exists()


def test_rotating_another_users_key_needs_change_apikey_and_is_audited(client_for, user, run_on_commit):
    theirs = ApiKeyFactory(owner=user)
    staff = _staff_with("change_apikey")  # change implies view, as in the admin
    api = client_for(staff)

    with run_on_commit():
        answer = api.post(f"{_detail(theirs.pk)}rotate/", {}, format="json")

    assert answer.status_code == 200, answer.content
    assert key_verify(answer.json()["key"], None).key_id == theirs.pk
    event = AuditEvent.objects.get(action="key.rotate")
    assert event.actor_id == staff.pk
    assert api.delete(_detail(theirs.pk)).status_code == 403  # revoking needs delete_apikey


def test_revoking_another_users_key_needs_delete_apikey(client_for, user, run_on_commit):
    theirs = ApiKeyFactory(owner=user)
    api = client_for(_staff_with("view_apikey", "delete_apikey"))

    with run_on_commit():
        assert api.delete(_detail(theirs.pk)).status_code == 204

    theirs.refresh_from_db()
    assert theirs.revoked_at is not None


def test_staff_with_permissions_list_query_count_is_bounded(client_for, django_assert_max_num_queries):
    for owner in UserFactory.create_batch(5):
        ApiKeyFactory.create_batch(4, owner=owner)
    api = client_for(_staff_with("view_apikey"))
    # JWT user lookup, the user's and their groups' permissions, COUNT, page, the page's budget spend.
    with django_assert_max_num_queries(6):
        answer = api.get(URL)
    assert answer.json()["count"] == 20


def test_anonymous_requests_are_refused(client):
    assert client.get(URL).status_code == 401


def test_patch_changes_limits_and_scopes_and_is_audited(api, user, public_models, run_on_commit):
    key = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)  # cached before the change

    with run_on_commit():
        answer = api.patch(
            _detail(key.pk),
            {"rpm_limit": 10, "allowed_models": ["gpt-4o-mini"], "ip_allowlist": ["10.1.2.3/8"]},
            format="json",
        )

    assert answer.status_code == 200, answer.content
    assert answer.json()["ip_allowlist"] == ["10.0.0.0/8"]
    policy = key_verify(key.secret, "10.9.9.9")
    assert (policy.rpm_limit, policy.allowed_models) == (10, frozenset({"gpt-4o-mini"}))
    event = AuditEvent.objects.get(action="key.update")
    assert event.changes["rpm_limit"] == [None, 10]
    assert event.ip_address == "198.51.100.7"


def test_patch_is_active_false_disables_the_key(api, user, run_on_commit):
    key = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)

    with run_on_commit():
        assert api.patch(_detail(key.pk), {"is_active": False}, format="json").status_code == 200

    with pytest.raises(KeyRefused) as refused:
        key_verify(key.secret, None)
    assert refused.value.reason == "inactive"
    assert AuditEvent.objects.filter(action="key.disable", object_id=str(key.pk)).exists()


def test_delete_revokes_the_key_and_keeps_the_record(api, user, run_on_commit):
    key = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)

    with run_on_commit():
        assert api.delete(_detail(key.pk)).status_code == 204

    with pytest.raises(KeyRefused) as refused:
        key_verify(key.secret, None)
    assert refused.value.reason == "revoked"
    body = api.get(_detail(key.pk)).json()
    assert body["is_active"] is False
    assert body["revoked_at"] is not None
    assert AuditEvent.objects.filter(action="key.revoke").count() == 1
    assert api.delete(_detail(key.pk)).status_code == 204  # idempotent, not audited twice
    assert AuditEvent.objects.filter(action="key.revoke").count() == 1


def test_a_revoked_key_cannot_be_enabled_again(api, user):
    key = ApiKeyFactory(owner=user, is_active=False, revoked_at=timezone.now())

    answer = api.patch(_detail(key.pk), {"is_active": True}, format="json")

    assert answer.status_code == 400
    assert "is_active" in answer.json()["fields"]


def test_rotate_returns_a_new_secret_once_and_keeps_the_record(api, user, run_on_commit):
    key = ApiKeyFactory(owner=user, rpm_limit=5)

    with run_on_commit():
        answer = api.post(f"{_detail(key.pk)}rotate/", {"grace_seconds": 60}, format="json")

    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body["id"] == key.pk
    assert body["rpm_limit"] == 5
    assert body["key"] != key.secret
    assert body["prefix"] == body["key"][:12]
    assert body["previous_valid_until"] is not None
    assert key_verify(body["key"], None).key_id == key.pk
    assert key_verify(key.secret, None).key_id == key.pk  # within the grace period
    assert body["key"][4:] not in api.get(_detail(key.pk)).content.decode()
    event = AuditEvent.objects.get(action="key.rotate")
    assert event.changes["grace_seconds"] == 60
    assert body["key"][4:] not in str(event.changes)


def test_rotate_without_grace_stops_the_old_secret_at_once(api, user, run_on_commit):
    key = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)

    with run_on_commit():
        body = api.post(f"{_detail(key.pk)}rotate/", format="json").json()

    with pytest.raises(KeyRefused) as refused:
        key_verify(key.secret, None)
    assert refused.value.reason == "unknown"
    assert key_verify(body["key"], None).key_id == key.pk


def test_a_revoked_key_cannot_be_rotated(api, user):
    key = ApiKeyFactory(owner=user, is_active=False, revoked_at=timezone.now())

    answer = api.post(f"{_detail(key.pk)}rotate/", format="json")

    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid"


def test_put_is_not_offered(api, user):
    key = ApiKeyFactory(owner=user)
    assert api.put(_detail(key.pk), {"name": "x"}, format="json").status_code == 405


FUTURE = (timezone.now() + timedelta(days=30)).isoformat()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "k", "rpm_limit": -1}, "rpm_limit"),
        ({"name": "k", "tpm_limit": -5}, "tpm_limit"),
        ({"name": "k", "max_concurrency": -1}, "max_concurrency"),
        ({"name": "k", "budget_tokens": -1}, "budget_tokens"),
        ({"name": "k", "budget_cost": "-0.01"}, "budget_cost"),
        ({"name": "k", "budget_period": "week"}, "budget_period"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "k", "ip_allowlist": ["10.0.0.0/33"]}, "ip_allowlist"),
        ({"name": "k", "ip_allowlist": ["2001:db8::/129"]}, "ip_allowlist"),
        ({"name": "k", "ip_allowlist": ["not-an-ip"]}, "ip_allowlist"),
        ({"name": "k", "ip_allowlist": "10.0.0.0/8"}, "ip_allowlist"),
        ({"name": "k", "allowed_models": ["no-such-model"]}, "allowed_models"),
        ({"name": "k", "allowed_models": "gpt-4o"}, "allowed_models"),
        ({"name": "k", "allowed_routes": ["bad route/name"]}, "allowed_routes"),
        ({"name": "k", "metadata": ["not", "an", "object"]}, "metadata"),
        ({"name": "k", "rpm_limt": 5}, "rpm_limt"),
        ({"name": "k", "prefix": "afk-mine"}, "prefix"),
        ({"name": "k", "key": "afk-choose-my-own-secret-please"}, "key"),
        ({"name": "k", "owner": 1}, "owner"),
        ({"name": ""}, "name"),
        ({}, "name"),
    ],
)
def test_bad_input_on_create_answers_400_with_a_field_error(api, public_models, payload, field):
    answer = api.post(URL, payload, format="json")

    assert answer.status_code == 400, answer.content
    body = answer.json()
    assert body["code"] == "invalid"
    assert field in body["fields"], body
    assert ApiKey.objects.count() == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"ip_allowlist": ["300.1.1.1"]}, "ip_allowlist"),
        ({"allowed_models": ["no-such-model"]}, "allowed_models"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"created_at": FUTURE}, "created_at"),
    ],
)
def test_bad_input_on_patch_answers_400_with_a_field_error(api, user, payload, field):
    key = ApiKeyFactory(owner=user)

    answer = api.patch(_detail(key.pk), payload, format="json")

    assert answer.status_code == 400, answer.content
    assert field in answer.json()["fields"]
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize("payload", [{"grace_seconds": -1}, {"grace_seconds": "soon"}, {"grace": 5}])
def test_bad_input_on_rotate_answers_400_with_a_field_error(api, user, payload):
    key = ApiKeyFactory(owner=user)

    answer = api.post(f"{_detail(key.pk)}rotate/", payload, format="json")

    assert answer.status_code == 400
    assert set(answer.json()["fields"]) == set(payload)
    key.refresh_from_db()
    assert key.previous_digest is None


def test_a_body_that_is_not_an_object_answers_400(api):
    answer = api.post(URL, ["name", "k"], format="json")
    assert answer.status_code == 400
    assert "non_field_errors" in answer.json()["fields"]


def test_several_bad_fields_are_reported_together(api):
    answer = api.post(URL, {"name": "k", "rpm_limit": -1, "colour": "red"}, format="json")
    assert set(answer.json()["fields"]) == {"rpm_limit", "colour"}


def test_valid_expiry_scopes_and_budget_are_accepted(api, public_models):
    answer = api.post(
        URL,
        {
            "name": "full",
            "expires_at": FUTURE,
            "allowed_models": ["gpt-4o", "gpt-4o"],
            "allowed_routes": ["billing.v2"],
            "ip_allowlist": ["192.0.2.0/24", "2001:db8::1"],
            "tpm_limit": 0,
            "max_concurrency": 4,
            "budget_tokens": 1_000_000,
            "budget_cost": "12.50",
            "budget_period": "day",
            "metadata": {"team": "search"},
        },
        format="json",
    )

    assert answer.status_code == 201, answer.content
    body = answer.json()
    assert body["allowed_models"] == ["gpt-4o"]
    assert body["ip_allowlist"] == ["192.0.2.0/24", "2001:db8::1/128"]
    assert (body["budget_cost"], body["budget_period"], body["metadata"]) == ("12.500000", "day", {"team": "search"})


def test_schema_documents_the_keys_api(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()

    paths = schema["paths"]
    assert {"/api/keys/", "/api/keys/{id}/", "/api/keys/{id}/rotate/"} <= set(paths)
    assert "put" not in paths["/api/keys/{id}/"]
    assert paths["/api/keys/"]["get"]["tags"] == ["keys"]
    components = schema["components"]["schemas"]
    rotate_body = paths["/api/keys/{id}/rotate/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "grace_seconds" in components[rotate_body["$ref"].rsplit("/", 1)[-1]]["properties"]
    created = paths["/api/keys/"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    rotated = paths["/api/keys/{id}/rotate/"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert created == rotated["$ref"]
    assert "key" in components[created.rsplit("/", 1)[-1]]["properties"]
    listed = components["ApiKey"]["properties"]
    assert "key" not in listed
    assert "digest" not in listed
    assert "revoked_at" in listed
