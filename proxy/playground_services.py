"""Writes of the admin Playground: issuing the short-lived token the page calls the proxy with, audited."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction

from gateway_stats.services import audit_record
from keys.playground import playground_token_max_age, playground_token_mint

if TYPE_CHECKING:
    from keys.models import ApiKey

AUDIT_ACTION = "key.playground"
# The key's own audit object type (``keys.services.AUDIT_OBJECT_TYPE``), so the event sits in the key's history.
AUDIT_OBJECT_TYPE = "keys.apikey"


@transaction.atomic
def playground_token_issue(*, key: ApiKey, actor: AbstractBaseUser | None = None, ip_address: str | None = None) -> str:
    """A playground token for ``key`` (``keys.playground``), recorded as ``key.playground`` on the key.

    The caller has checked that ``actor`` may use the key. The token itself is never recorded: the event
    says only who asked, for which key, and how long the token lasts.
    """
    token = playground_token_mint(key.pk)
    audit_record(
        actor=actor,
        action=AUDIT_ACTION,
        object_type=AUDIT_OBJECT_TYPE,
        object_id=key.pk,
        object_repr=str(key),
        changes={"max_age_s": playground_token_max_age()},
        ip_address=ip_address,
    )
    return token
