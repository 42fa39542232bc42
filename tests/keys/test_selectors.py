"""Key selectors: what a user may see, and the model scopes of a user's usable keys."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from keys.selectors import key_list, key_model_scopes_for_user, key_names_for_owner, key_record_by_digest
from tests.factories import ApiKeyFactory

pytestmark = pytest.mark.django_db


def test_key_list_shows_owners_their_keys_and_staff_every_key(user, other_user, staff):
    mine = ApiKeyFactory(owner=user)
    revoked = ApiKeyFactory(owner=user, is_active=False, revoked_at=timezone.now())
    theirs = ApiKeyFactory(owner=other_user)

    assert set(key_list(actor=user)) == {mine, revoked}
    assert set(key_list(actor=staff)) == {mine, revoked, theirs}


def test_model_scopes_count_only_usable_keys(user):
    assert key_model_scopes_for_user(user_id=user.pk) == (False, set())
    ApiKeyFactory(owner=user, allowed_models=["a"])
    ApiKeyFactory(owner=user, allowed_models=["b"], is_active=False)
    ApiKeyFactory(owner=user, allowed_models=["c"], expires_at=timezone.now() - timedelta(seconds=1))
    assert key_model_scopes_for_user(user_id=user.pk) == (False, {"a"})

    ApiKeyFactory(owner=user, allowed_models=[])
    assert key_model_scopes_for_user(user_id=user.pk) == (True, set())


def test_key_names_for_owner(user, other_user):
    ApiKeyFactory(owner=user, name="one")
    ApiKeyFactory(owner=user, name="two", is_active=False, revoked_at=timezone.now())
    ApiKeyFactory(owner=other_user, name="three")

    assert key_names_for_owner(owner_id=user.pk) == {"one", "two"}


def test_the_record_of_a_previous_digest_carries_its_deadline(user):
    key = ApiKeyFactory(owner=user, previous_digest="f" * 64, previous_valid_until=timezone.now() + timedelta(hours=1))

    current = key_record_by_digest(digest=key.digest)
    previous = key_record_by_digest(digest="f" * 64)

    assert current.valid_until is None
    assert previous.policy == current.policy
    assert previous.valid_until == pytest.approx(key.previous_valid_until.timestamp())
    key.previous_valid_until = timezone.now() - timedelta(seconds=1)
    key.save()
    assert key_record_by_digest(digest="f" * 64) is None
    assert key_record_by_digest(digest="0" * 64) is None
