"""The keys admin: issue with the secret shown once, edit, rotate, disable/enable/revoke, delete; never a digest."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from gateway_stats.models import AuditEvent
from keys.exceptions import KeyRefused
from keys.models import ApiKey
from keys.verification import key_verify
from tests.factories import ApiKeyFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/keys/apikey/"
SECRET_IN_PAGE = re.compile(r'value="(afk-[A-Za-z0-9_\-]+)"')


@pytest.fixture
def admin_client_(staff) -> Client:
    client = Client(REMOTE_ADDR="192.0.2.50")
    client.force_login(staff)
    return client


def _form(**overrides: str) -> dict[str, str]:
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


def test_creating_a_key_shows_its_secret_once_on_the_next_page(admin_client_, user, staff, public_models):
    answer = admin_client_.post(
        f"{CHANGELIST}add/",
        _form(owner=str(user.pk), allowed_models="gpt-4o", ip_allowlist="10.0.0.0/8, 2001:db8::/32", rpm_limit="60"),
    )

    assert answer.status_code == 200, answer.content
    assert "no-store" in answer["Cache-Control"]
    secret = SECRET_IN_PAGE.search(answer.content.decode()).group(1)
    key = ApiKey.objects.get()
    assert (key.owner, key.allowed_models, key.rpm_limit) == (user, ["gpt-4o"], 60)
    assert key.ip_allowlist == ["10.0.0.0/8", "2001:db8::/32"]
    assert key.digest not in answer.content.decode()
    assert key_verify(secret, "10.1.1.1").key_id == key.pk

    for page in (CHANGELIST, f"{CHANGELIST}{key.pk}/change/"):
        html = admin_client_.get(page).content.decode()
        assert secret[4:] not in html
        assert key.digest not in html
    assert secret[4:] not in str(list(admin_client_.session.items()))
    event = AuditEvent.objects.get(action="key.create")
    assert (event.actor, event.ip_address) == (staff, "192.0.2.50")


def test_the_add_form_reports_bad_values_instead_of_creating(admin_client_, user):
    past = timezone.now() - timedelta(days=1)
    answer = admin_client_.post(
        f"{CHANGELIST}add/",
        _form(
            owner=str(user.pk),
            allowed_models="no-such-model",
            ip_allowlist="10.0.0.0/99",
            rpm_limit="-1",
            expires_at_0=past.strftime("%Y-%m-%d"),
            expires_at_1=past.strftime("%H:%M:%S"),
        ),
    )

    assert answer.status_code == 200
    errors = answer.context["adminform"].form.errors
    assert {"allowed_models", "ip_allowlist", "rpm_limit", "expires_at"} <= set(errors)
    assert not ApiKey.objects.exists()


def test_editing_limits_goes_through_the_service(admin_client_, user, run_on_commit):
    key = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)

    with run_on_commit():
        answer = admin_client_.post(f"{CHANGELIST}{key.pk}/change/", _form(name=key.name, rpm_limit="10"))

    assert answer.status_code == 302, answer.context["adminform"].form.errors if answer.context else answer
    assert key_verify(key.secret, None).rpm_limit == 10
    assert AuditEvent.objects.get(action="key.update").changes == {"rpm_limit": [None, 10]}


def test_a_revoked_key_cannot_be_enabled_in_the_change_form(admin_client_, user):
    key = ApiKeyFactory(owner=user, is_active=False, revoked_at=timezone.now())

    answer = admin_client_.post(f"{CHANGELIST}{key.pk}/change/", _form(name=key.name))

    assert answer.status_code == 200
    assert "is_active" in answer.context["adminform"].form.errors


def test_disable_enable_and_revoke_actions(admin_client_, user, run_on_commit):
    first, second = ApiKeyFactory.create_batch(2, owner=user)
    selected = [str(first.pk), str(second.pk)]

    with run_on_commit():
        admin_client_.post(CHANGELIST, {"action": "disable_keys", "_selected_action": selected})
    assert not ApiKey.objects.filter(is_active=True).exists()
    with pytest.raises(KeyRefused):
        key_verify(first.secret, None)

    with run_on_commit():
        admin_client_.post(CHANGELIST, {"action": "enable_keys", "_selected_action": selected})
    assert ApiKey.objects.filter(is_active=True).count() == 2
    assert key_verify(first.secret, None).key_id == first.pk

    with run_on_commit():
        admin_client_.post(CHANGELIST, {"action": "revoke_keys", "_selected_action": [str(first.pk)]})
        admin_client_.post(CHANGELIST, {"action": "enable_keys", "_selected_action": selected})
    first.refresh_from_db()
    assert first.revoked_at is not None
    assert first.is_active is False
    with pytest.raises(KeyRefused) as refused:
        key_verify(first.secret, None)
    assert refused.value.reason == "revoked"
    actions = list(AuditEvent.objects.filter(object_type="keys.apikey").values_list("action", flat=True))
    assert sorted(set(actions)) == ["key.disable", "key.enable", "key.revoke"]


def test_rotating_in_the_admin_shows_the_new_secret_once(admin_client_, user, run_on_commit):
    key = ApiKeyFactory(owner=user)
    assert admin_client_.get(f"{CHANGELIST}{key.pk}/change/").content.decode().count("/rotate/") == 1
    assert admin_client_.get(f"{CHANGELIST}{key.pk}/rotate/").status_code == 200

    with run_on_commit():
        answer = admin_client_.post(f"{CHANGELIST}{key.pk}/rotate/", {"grace_seconds": "0"})

    assert answer.status_code == 200
    secret = SECRET_IN_PAGE.search(answer.content.decode()).group(1)
    assert key_verify(secret, None).key_id == key.pk
    with pytest.raises(KeyRefused):
        key_verify(key.secret, None)


def test_a_revoked_key_cannot_be_rotated_in_the_admin(admin_client_, user):
    key = ApiKeyFactory(owner=user, is_active=False, revoked_at=timezone.now())

    answer = admin_client_.post(f"{CHANGELIST}{key.pk}/rotate/", {"grace_seconds": "0"})

    assert answer.status_code == 302
    assert not AuditEvent.objects.filter(object_type="keys.apikey").exists()


def test_deleting_in_the_admin_goes_through_the_service(admin_client_, user, run_on_commit):
    key = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)

    with run_on_commit():
        answer = admin_client_.post(f"{CHANGELIST}{key.pk}/delete/", {"post": "yes"})

    assert answer.status_code == 302
    assert not ApiKey.objects.exists()
    assert AuditEvent.objects.get(object_type="keys.apikey").action == "key.delete"
    with pytest.raises(KeyRefused):
        key_verify(key.secret, None)


def test_the_changelist_searches_by_owner_and_filters(admin_client_, user, other_user):
    mine = ApiKeyFactory(owner=user, name="alpha")
    ApiKeyFactory(owner=other_user, name="beta", is_active=False)

    found = admin_client_.get(f"{CHANGELIST}?q=alice").context["cl"].result_list
    assert list(found) == [mine]
    active = admin_client_.get(f"{CHANGELIST}?is_active__exact=1").context["cl"].result_list
    assert list(active) == [mine]
    revoked = admin_client_.get(f"{CHANGELIST}?revoked_at__isempty=0").context["cl"].result_list
    assert list(revoked) == []


@pytest.mark.parametrize("keys", [3, 30])
def test_the_changelist_query_count_does_not_grow_with_keys(admin_client_, keys, django_assert_max_num_queries):
    for owner in UserFactory.create_batch(3):
        ApiKeyFactory.create_batch(keys // 3, owner=owner)
    # session, user, two counts, the page (owners joined), the date hierarchy, the page's spend from the ledger.
    with django_assert_max_num_queries(8):
        answer = admin_client_.get(CHANGELIST)
    assert answer.status_code == 200
