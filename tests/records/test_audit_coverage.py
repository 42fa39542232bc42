"""What reaches the audit trail: logins, failed logins and logouts (API and admin), and every management write of
keys, upstreams, models and users through the API and the admin, with actor and address, and never a secret."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import User
from gateway_stats.models import AuditEvent
from keys.models import ApiKey
from proxy.models import Model, Upstream
from tests.factories import DEFAULT_PASSWORD, ApiKeyFactory, UserFactory
from tests.proxy.factories import UpstreamFactory

pytestmark = pytest.mark.django_db

WRONG_PASSWORD = "wrong-Password-that-is-long-77"
UPSTREAM_SECRET = "sk-upstream-audit-secret-123456"
HEADER_SECRET = "header-audit-secret-value-55"
NEW_PASSWORD = "brand-New-password-for-alice-91"


def _only(action: str, **filters: Any) -> AuditEvent:
    return AuditEvent.objects.get(action=action, **filters)


def _trail_text() -> str:
    return str(list(AuditEvent.objects.values()))


# --- logins, failed logins, logouts ----------------------------------------------------------------


def test_an_api_login_is_audited_with_the_user_and_address(alice):
    answer = APIClient().post(
        "/auth/login", {"username": "alice", "password": DEFAULT_PASSWORD}, format="json", REMOTE_ADDR="198.51.100.20"
    )

    assert answer.status_code == 200
    event = _only("user.login")
    assert (event.actor, event.object_type, event.object_id, event.object_repr) == (
        alice,
        "accounts.user",
        str(alice.pk),
        "alice",
    )
    assert (event.ip_address, event.changes) == ("198.51.100.20", {"path": "/auth/login"})
    alice.refresh_from_db()
    assert alice.last_login is not None  # still set, by Django's own receiver of the same signal


def test_a_failed_api_login_names_the_account_but_never_the_password(alice):
    client = APIClient(REMOTE_ADDR="198.51.100.21")
    answer = client.post("/auth/login", {"username": "alice", "password": WRONG_PASSWORD}, format="json")

    assert answer.status_code == 401
    event = _only("user.login_failed")
    assert (event.actor, event.object_id, event.object_repr, event.ip_address) == (
        None,
        str(alice.pk),
        "alice",
        "198.51.100.21",
    )
    assert event.changes == {"path": "/auth/login", "username_known": True}
    assert WRONG_PASSWORD not in _trail_text()
    assert not AuditEvent.objects.filter(action="user.login").exists()


def test_a_failed_login_for_an_unknown_username_does_not_store_what_was_typed(db):
    typed = "maybe-a-password-typed-in-the-wrong-box"
    client = APIClient(REMOTE_ADDR="198.51.100.22")
    assert client.post("/auth/login", {"username": typed, "password": WRONG_PASSWORD}, format="json").status_code == 401

    event = _only("user.login_failed")
    assert (event.object_id, event.object_repr, event.changes) == (
        "",
        "",
        {"path": "/auth/login", "username_known": False},
    )
    assert typed not in _trail_text()


def test_an_api_logout_is_audited(alice):
    client = APIClient(REMOTE_ADDR="198.51.100.23")
    tokens = client.post("/auth/login", {"username": "alice", "password": DEFAULT_PASSWORD}, format="json").json()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")

    assert client.post("/auth/logout", {"refresh": tokens["refresh"]}, format="json").status_code == 205

    event = _only("user.logout")
    assert (event.actor, event.object_id, event.ip_address) == (alice, str(alice.pk), "198.51.100.23")
    assert event.changes == {"path": "/auth/logout"}


def test_a_refused_logout_is_not_audited(alice, bob):
    from rest_framework_simplejwt.tokens import RefreshToken

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(alice).access_token}")
    assert client.post("/auth/logout", {"refresh": str(RefreshToken.for_user(bob))}, format="json").status_code == 400
    assert not AuditEvent.objects.filter(action="user.logout").exists()


def test_admin_login_failed_login_and_logout_are_audited(root):
    client = Client(REMOTE_ADDR="192.0.2.60")

    refused = client.post("/admin/login/", {"username": "root", "password": WRONG_PASSWORD})
    assert refused.status_code == 200  # the form again, with its error
    accepted = client.post("/admin/login/", {"username": "root", "password": DEFAULT_PASSWORD})
    assert accepted.status_code == 302
    assert client.post("/admin/logout/").status_code == 200

    events = list(AuditEvent.objects.order_by("id").values_list("action", "actor", "object_id", "ip_address"))
    assert events == [
        ("user.login_failed", None, str(root.pk), "192.0.2.60"),
        ("user.login", root.pk, str(root.pk), "192.0.2.60"),
        ("user.logout", root.pk, str(root.pk), "192.0.2.60"),
    ]
    assert {event.changes["path"] for event in AuditEvent.objects.all()} == {"/admin/login/", "/admin/logout/"}
    assert WRONG_PASSWORD not in _trail_text()


def test_a_logout_without_a_session_records_nothing(db):
    assert Client().post("/admin/logout/").status_code in {200, 302}
    assert not AuditEvent.objects.exists()


# --- keys through the API and the admin ------------------------------------------------------------


def test_a_key_created_changed_and_revoked_through_the_api_is_audited(api_for, alice):
    client = api_for(alice)

    created = client.post("/api/keys/", {"name": "ci"}, format="json")
    assert created.status_code == 201
    key_id = created.json()["id"]
    assert client.patch(f"/api/keys/{key_id}/", {"rpm_limit": 60}, format="json").status_code == 200
    assert client.delete(f"/api/keys/{key_id}/").status_code == 204

    events = AuditEvent.objects.filter(object_type="keys.apikey", object_id=str(key_id)).order_by("id")
    assert [e.action for e in events] == ["key.create", "key.update", "key.revoke"]
    assert {(e.actor_id, e.ip_address) for e in events} == {(alice.pk, "198.51.100.7")}
    assert events[1].changes == {"rpm_limit": [None, 60]}
    assert created.json()["key"][4:] not in _trail_text()
    key = ApiKey.objects.get(pk=key_id)
    assert key.digest not in _trail_text()


def _key_form(**overrides: str) -> dict[str, str]:
    data = {
        "name": "from admin",
        "is_active": "on",
        "expires_at_0": "",
        "expires_at_1": "",
        "allowed_models": "",
        "allowed_routes": "",
        "ip_allowlist": "",
        "rpm_limit": "",
        "tpm_limit": "",
        "max_concurrency": "",
        "budget_tokens": "",
        "budget_cost": "",
        "budget_period": "month",
        "metadata": "{}",
    }
    data.update(overrides)
    return data


def test_a_key_created_changed_and_deleted_in_the_admin_is_audited(admin_for, root, alice):
    client = admin_for(root)

    assert client.post("/admin/keys/apikey/add/", _key_form(owner=str(alice.pk))).status_code == 200
    key = ApiKey.objects.get()
    changed = client.post(f"/admin/keys/apikey/{key.pk}/change/", _key_form(name="renamed"))
    assert changed.status_code == 302
    deleted = client.post(f"/admin/keys/apikey/{key.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302

    events = AuditEvent.objects.filter(object_type="keys.apikey").order_by("id")
    assert [e.action for e in events] == ["key.create", "key.update", "key.delete"]
    assert {(e.actor_id, e.ip_address) for e in events} == {(root.pk, "192.0.2.50")}
    assert events[1].changes == {"name": ["from admin", "renamed"]}
    assert key.digest not in _trail_text()


# --- upstreams and models through the admin --------------------------------------------------------


def _upstream_form(**overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": "audited-up",
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


def test_an_upstream_added_changed_and_deleted_in_the_admin_is_audited_without_its_secrets(admin_for, root):
    client = admin_for(root)
    added = client.post(
        "/admin/proxy/upstream/add/",
        _upstream_form(api_key=UPSTREAM_SECRET, extra_headers=f'{{"X-Org": "{HEADER_SECRET}"}}'),
    )
    assert added.status_code == 302, added.content[:2000]
    upstream = Upstream.objects.get()
    url = f"/admin/proxy/upstream/{upstream.pk}/"

    changed = client.post(
        f"{url}change/",
        _upstream_form(timeout_s="12", api_key="sk-another-secret-777", extra_headers='{"X-Org": "***"}'),
    )
    assert changed.status_code == 302, changed.content[:2000]
    assert client.post(f"{url}delete/", {"post": "yes"}).status_code == 302

    events = AuditEvent.objects.filter(object_type="proxy.upstream").order_by("id")
    assert [e.action for e in events] == ["upstream.create", "upstream.update", "upstream.delete"]
    assert {(e.actor_id, e.ip_address) for e in events} == {(root.pk, "192.0.2.50")}
    assert events[1].changes["timeout_s"] == [30.0, 12.0]
    assert events[1].changes["api_key"] == "changed"
    for secret in (UPSTREAM_SECRET, HEADER_SECRET, "sk-another-secret-777"):
        assert secret not in _trail_text()


def _model_form(upstream: Upstream, **overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": "gpt-audit",
        "is_active": "on",
        "fallbacks": "[]",
        "input_price_per_1k": "0.0025",
        "output_price_per_1k": "0.01",
        "output_tokens_estimate": "256",
        "deployments-TOTAL_FORMS": "1",
        "deployments-INITIAL_FORMS": "0",
        "deployments-MIN_NUM_FORMS": "1",
        "deployments-MAX_NUM_FORMS": "1000",
        "deployments-0-upstream": str(upstream.pk),
        "deployments-0-upstream_model": "gpt-audit-1",
        "deployments-0-weight": "1",
        "deployments-0-is_active": "on",
    }
    form.update(overrides)
    return form


def test_a_model_added_changed_and_deleted_in_the_admin_is_audited(admin_for, root):
    upstream = UpstreamFactory()
    client = admin_for(root)
    assert client.post("/admin/proxy/model/add/", _model_form(upstream)).status_code == 302
    model = Model.objects.get()
    deployment = model.deployments.get()
    url = f"/admin/proxy/model/{model.pk}/"

    changed = client.post(
        f"{url}change/",
        _model_form(
            upstream,
            output_price_per_1k="0.02",
            **{
                "deployments-INITIAL_FORMS": "1",
                "deployments-0-id": str(deployment.pk),
                "deployments-0-model": str(model.pk),
            },
        ),
    )
    assert changed.status_code == 302, changed.content[:3000]
    assert client.post(f"{url}delete/", {"post": "yes"}).status_code == 302

    events = AuditEvent.objects.filter(object_type="proxy.model").order_by("id")
    assert [e.action for e in events] == ["model.create", "model.deployments_update", "model.update", "model.delete"]
    assert {(e.actor_id, e.ip_address) for e in events} == {(root.pk, "192.0.2.50")}
    assert events[2].changes == {"output_price_per_1k": ["0.010000", "0.02"]}


# --- users through the admin -----------------------------------------------------------------------

USERS = "/admin/accounts/user/"


def _user_change_form(user: User, **overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "username": user.username,
        "email": user.email,
        "display_name": user.display_name,
        "first_name": "",
        "last_name": "",
        "is_active": "on",
        "budget_period": user.budget_period,
        "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
    }
    form.update(overrides)
    return {key: value for key, value in form.items() if value is not None}


def test_a_user_added_in_the_admin_is_audited_without_the_password(admin_for, root):
    client = admin_for(root)

    answer = client.post(
        f"{USERS}add/",
        {
            "username": "carol",
            "email": "carol@example.com",
            "display_name": "Carol",
            "usable_password": "true",
            "password1": NEW_PASSWORD,
            "password2": NEW_PASSWORD,
        },
    )

    assert answer.status_code == 302, answer.content[:3000]
    carol = User.objects.get(username="carol")
    event = _only("user.create")
    assert (event.actor, event.object_id, event.object_repr, event.ip_address) == (
        root,
        str(carol.pk),
        "carol",
        "192.0.2.50",
    )
    assert event.changes["email"] == "carol@example.com"
    assert event.changes["is_staff"] is False
    assert "password" not in event.changes
    assert NEW_PASSWORD not in _trail_text()
    assert carol.password not in _trail_text()


def test_a_user_changed_in_the_admin_is_audited_field_by_field_with_groups_and_permissions(admin_for, root, alice):
    group = Group.objects.create(name="operators")
    permission = Permission.objects.get(codename="view_usagerecord")
    client = admin_for(root)

    answer = client.post(
        f"{USERS}{alice.pk}/change/",
        _user_change_form(
            alice,
            email="alice@corp.example",
            is_staff="on",
            groups=[str(group.pk)],
            user_permissions=[str(permission.pk)],
        ),
    )

    assert answer.status_code == 302, answer.content[:3000]
    events = AuditEvent.objects.filter(action="user.update", object_id=str(alice.pk)).order_by("id")
    assert {(e.actor_id, e.ip_address) for e in events} == {(root.pk, "192.0.2.50")}
    merged: dict[str, Any] = {}
    for event in events:
        merged.update(event.changes)
    assert merged == {
        "email": ["alice@example.com", "alice@corp.example"],
        "is_staff": [False, True],
        "groups": {"added": ["operators"]},
        "user_permissions": {"added": ["gateway_stats.view_usagerecord"]},
    }

    # Taking them away again is audited too; saving without a change records nothing more.
    client.post(f"{USERS}{alice.pk}/change/", _user_change_form(alice, email="alice@corp.example", is_staff="on"))
    client.post(f"{USERS}{alice.pk}/change/", _user_change_form(alice, email="alice@corp.example", is_staff="on"))
    latest = [e.changes for e in AuditEvent.objects.filter(action="user.update").order_by("id")][len(events) :]
    assert sorted(map(str, latest)) == sorted(
        map(
            str,
            [
                {"groups": {"removed": ["operators"]}},
                {"user_permissions": {"removed": ["gateway_stats.view_usagerecord"]}},
            ],
        )
    )


def test_a_password_set_in_the_admin_is_audited_as_changed_never_as_a_value(admin_for, root, alice):
    old_hash = alice.password
    answer = admin_for(root).post(
        f"{USERS}{alice.pk}/password/",
        {"usable_password": "true", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD},
    )

    assert answer.status_code == 302, answer.content[:3000]
    alice.refresh_from_db()
    event = _only("user.update")
    assert (event.actor, event.changes) == (root, {"password": "changed"})
    for secret in (NEW_PASSWORD, old_hash, alice.password):
        assert secret not in _trail_text()


def test_a_user_deleted_in_the_admin_is_audited(admin_for, root):
    carol = UserFactory(username="carol")
    dave = UserFactory(username="dave")
    client = admin_for(root)

    assert client.post(f"{USERS}{carol.pk}/delete/", {"post": "yes"}).status_code == 302
    bulk = client.post(USERS, {"action": "delete_selected", "_selected_action": [str(dave.pk)], "post": "yes"})
    assert bulk.status_code == 302

    events = AuditEvent.objects.filter(action="user.delete").order_by("id")
    assert [(e.object_id, e.object_repr, e.actor_id) for e in events] == [
        (str(carol.pk), "carol", root.pk),
        (str(dave.pk), "dave", root.pk),
    ]
    assert not User.objects.filter(username__in=["carol", "dave"]).exists()


def test_writes_outside_the_admin_are_not_management_writes(alice, api_for):
    """A registration, a login's last_login, a factory: no user.* write events (the login itself is audited)."""
    UserFactory(username="erin")
    answer = APIClient().post(
        "/auth/register", {"username": "frank", "email": "frank@example.com", "password": NEW_PASSWORD}, format="json"
    )
    assert answer.status_code == 201
    APIClient().post("/auth/login", {"username": "alice", "password": DEFAULT_PASSWORD}, format="json")

    assert list(AuditEvent.objects.values_list("action", flat=True)) == ["user.login"]


def test_a_key_of_someone_else_changed_by_staff_names_the_staff_member(api_for, root, alice):
    key = ApiKeyFactory(owner=alice)
    assert api_for(root).patch(f"/api/keys/{key.pk}/", {"name": "by staff"}, format="json").status_code == 200
    event = _only("key.update")
    assert (event.actor, event.object_id) == (root, str(key.pk))


def test_a_session_logout_of_nobody_records_nothing(rf):
    from django.contrib.auth import logout
    from django.contrib.auth.models import AnonymousUser
    from django.contrib.sessions.backends.db import SessionStore

    request = rf.post("/admin/logout/")
    request.session = SessionStore()
    request.user = AnonymousUser()
    logout(request)

    assert not AuditEvent.objects.exists()


def test_a_superuser_deleting_their_own_account_is_audited_without_an_actor(admin_for, root):
    client = admin_for(root)
    root_pk = root.pk

    assert client.post(f"{USERS}{root_pk}/delete/", {"post": "yes"}).status_code == 302

    event = _only("user.delete")
    assert (event.actor, event.object_id, event.ip_address) == (None, str(root_pk), "192.0.2.50")


def test_groups_cleared_through_an_admin_written_user_are_audited(rf, root, alice):
    alice.groups.add(Group.objects.create(name="operators"), Group.objects.create(name="billing"))
    request = rf.post(f"{USERS}{alice.pk}/change/", REMOTE_ADDR="192.0.2.70")
    request.user = root
    alice._audit_request = request  # as accounts.admin does for the users it writes

    alice.groups.clear()
    alice.groups.clear()  # nothing left: nothing more to record

    event = _only("user.update")
    assert (event.actor, event.ip_address) == (root, "192.0.2.70")
    assert event.changes == {"groups": {"removed": ["billing", "operators"]}}
