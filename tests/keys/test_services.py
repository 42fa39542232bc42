"""Key services: secrets and digests, audited writes, validation, and the last-used flush."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from gateway_stats.models import AuditEvent
from keys.hashing import key_digest, key_secret_generate
from keys.models import ApiKey
from keys.services import (
    key_create,
    key_delete,
    key_disable,
    key_enable,
    key_revoke,
    key_rotate,
    key_update,
    key_usage_flush,
)
from keys.verification import key_usage_drain, key_usage_restore, key_usage_touch
from tests.factories import ApiKeyFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_pending_uses():
    key_usage_drain()
    yield
    key_usage_drain()


# --- secrets and digests ------------------------------------------------------------------------------
def test_secrets_are_prefixed_and_carry_at_least_160_random_bits():
    secrets_ = {key_secret_generate() for _ in range(200)}

    assert len(secrets_) == 200
    for secret in secrets_:
        assert secret.startswith("afk-")
        assert len(secret[4:]) * 6 >= 160  # base64url: 6 bits a character


def test_the_digest_is_an_hmac_under_the_configured_pepper(settings):
    settings.API_KEY_PEPPER = "pepper-1"
    secret = key_secret_generate()

    assert key_digest(secret) == hmac.new(b"pepper-1", secret.encode(), hashlib.sha256).hexdigest()
    settings.API_KEY_PEPPER = "pepper-2"
    assert key_digest(secret) != hmac.new(b"pepper-1", secret.encode(), hashlib.sha256).hexdigest()


def test_without_a_pepper_the_digest_is_keyed_by_a_derivation_of_secret_key(settings):
    settings.API_KEY_PEPPER = ""
    secret = key_secret_generate()
    digest = key_digest(secret)

    assert digest != hashlib.sha256(secret.encode()).hexdigest()
    assert digest != hmac.new(settings.SECRET_KEY.encode(), secret.encode(), hashlib.sha256).hexdigest()
    settings.SECRET_KEY = "another-secret-key-" + "x" * 40
    assert key_digest(secret) != digest


def test_key_create_stores_the_digest_and_prefix_only(user, public_models):
    issued = key_create(owner=user, name="ci", allowed_models=["gpt-4o", "gpt-4o"], ip_allowlist=["10.0.0.1/8"])

    key = ApiKey.objects.get(pk=issued.key.pk)
    assert key.digest == key_digest(issued.secret)
    assert key.prefix == issued.secret[:12]
    assert key.allowed_models == ["gpt-4o"]
    assert key.ip_allowlist == ["10.0.0.0/8"]
    assert issued.secret not in str(ApiKey.objects.filter(pk=key.pk).values().get())


def test_key_create_audits_without_secret_or_digest(user, staff):
    issued = key_create(owner=user, name="ci", actor=staff, ip_address="2001:db8::7")

    event = AuditEvent.objects.get()
    assert (event.action, event.actor, event.ip_address) == ("key.create", staff, "2001:db8::7")
    assert (event.object_type, event.object_id) == ("keys.apikey", str(issued.key.pk))
    text = str(event.changes)
    assert issued.secret[4:] not in text
    assert issued.key.digest not in text


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"budget_cost": -1}, "budget_cost"),
        ({"expires_at": timezone.now() - timedelta(minutes=1)}, "expires_at"),
        ({"ip_allowlist": ["10.0.0.0/40"]}, "ip_allowlist"),
        ({"allowed_models": ["nope"]}, "allowed_models"),
        ({"allowed_routes": ["has space"]}, "allowed_routes"),
        ({"budget_period": "week"}, "budget_period"),
        ({"name": ""}, "name"),
    ],
)
def test_key_create_refuses_bad_values_with_field_errors(user, kwargs, field):
    values = {"name": "k", **kwargs}
    with pytest.raises(ValidationError) as invalid:
        key_create(owner=user, **values)
    assert field in invalid.value.message_dict
    assert not ApiKey.objects.exists()
    assert not AuditEvent.objects.exists()


# --- changes ---------------------------------------------------------------------------------------------
def test_key_update_writes_and_audits_only_what_differs(user, staff):
    key = ApiKeyFactory(owner=user, rpm_limit=5, name="a")

    key_update(key=key, changes={"rpm_limit": 5, "name": "a"}, actor=staff)
    assert not AuditEvent.objects.exists()

    key_update(key=key, changes={"rpm_limit": 6, "name": "b"}, actor=staff, ip_address="192.0.2.1")
    event = AuditEvent.objects.get()
    assert event.action == "key.update"
    assert event.changes == {"rpm_limit": [5, 6], "name": ["a", "b"]}
    key.refresh_from_db()
    assert (key.rpm_limit, key.name) == (6, "b")


def test_key_update_refuses_fields_that_are_not_updatable(user):
    key = ApiKeyFactory(owner=user)
    with pytest.raises(ValidationError) as invalid:
        key_update(key=key, changes={"digest": "0" * 64, "owner": 3})
    assert set(invalid.value.message_dict) == {"digest", "owner"}


def test_disable_and_enable_are_audited_as_such(user):
    key = ApiKeyFactory(owner=user)

    key_disable(key=key)
    key_disable(key=key)  # no-op
    key_enable(key=key)

    assert list(AuditEvent.objects.order_by("id").values_list("action", flat=True)) == ["key.disable", "key.enable"]


def test_revoke_keeps_the_row_and_cannot_be_undone(user):
    key = ApiKeyFactory(owner=user)

    key_revoke(key=key)
    key_revoke(key=key)

    key.refresh_from_db()
    assert key.revoked_at is not None
    assert key.is_active is False
    assert AuditEvent.objects.filter(action="key.revoke").count() == 1
    with pytest.raises(ValidationError):
        key_enable(key=key)
    with pytest.raises(ValidationError):
        key_rotate(key=key)


def test_rotate_keeps_the_record_and_changes_digest_and_prefix(user):
    key = ApiKeyFactory(owner=user, rpm_limit=3)
    old_digest = key.digest

    issued = key_rotate(key=key, grace_seconds=120)

    key.refresh_from_db()
    assert key.digest == key_digest(issued.secret) != old_digest
    assert key.prefix == issued.secret[:12]
    assert key.previous_digest == old_digest
    assert timedelta(seconds=110) < key.previous_valid_until - timezone.now() <= timedelta(seconds=120)
    assert key.rpm_limit == 3
    event = AuditEvent.objects.get(action="key.rotate")
    assert old_digest not in str(event.changes)
    assert issued.secret[4:] not in str(event.changes)


@pytest.mark.parametrize("grace", [-1, 30 * 24 * 3600 + 1])
def test_rotate_refuses_a_grace_period_out_of_range(user, grace):
    with pytest.raises(ValidationError) as invalid:
        key_rotate(key=ApiKeyFactory(owner=user), grace_seconds=grace)
    assert "grace_seconds" in invalid.value.message_dict


def test_key_delete_removes_the_row_and_is_audited(user, staff):
    key = ApiKeyFactory(owner=user)

    key_delete(key=key, actor=staff)

    assert not ApiKey.objects.exists()
    assert AuditEvent.objects.get().action == "key.delete"


def test_a_user_with_keys_cannot_be_deleted_by_accident(user):
    from django.db.models import ProtectedError

    ApiKeyFactory(owner=user)
    with pytest.raises(ProtectedError):
        user.delete()


# --- last_used_at ------------------------------------------------------------------------------------------
def test_usage_flush_writes_last_used_at_off_the_request_path(user, django_assert_num_queries):
    key = ApiKeyFactory(owner=user)

    with django_assert_num_queries(0):
        for _ in range(1000):
            key_usage_touch(key.pk)
    assert key_usage_flush() == 1

    key.refresh_from_db()
    assert abs((timezone.now() - key.last_used_at).total_seconds()) < 5


def test_usage_flush_writes_at_most_once_a_minute_per_key(user):
    key = ApiKeyFactory(owner=user)
    key_usage_touch(key.pk)
    key_usage_flush()

    key_usage_touch(key.pk)
    assert key_usage_flush() == 0  # used again within the minute: nothing written

    key_usage_restore({key.pk: time.time() + 61})  # a use a minute later
    assert key_usage_flush() == 1


def test_usage_flush_does_one_update_per_key_and_nothing_when_idle(user, django_assert_num_queries):
    keys = ApiKeyFactory.create_batch(3, owner=user)
    for key in keys:
        key_usage_touch(key.pk)
        key_usage_touch(key.pk)

    with django_assert_num_queries(3):
        assert key_usage_flush() == 3
    with django_assert_num_queries(0):
        assert key_usage_flush() == 0


def test_usage_flush_ignores_deleted_keys(user):
    key_usage_touch(987654)
    assert key_usage_flush() == 0


def test_uses_put_back_after_a_failed_flush_do_not_hide_newer_ones():
    key_usage_touch(2)  # used again while a flush holding older uses was failing

    key_usage_restore({1: 100.0, 2: 100.0})

    restored = key_usage_drain()
    assert restored[1] == 100.0
    assert restored[2] > time.time() - 60
