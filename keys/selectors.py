"""Reads of the keys app: the keys a user may see, and the record verification needs for a digest."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db.models import Q, QuerySet
from django.utils import timezone

from apiforge.permissions import staff_has_model_perm
from keys.models import ApiKey
from keys.policy import KeyPolicy, KeyRecord, KeyStateRefusal

if TYPE_CHECKING:
    from accounts.models import User

_RECORD_FIELDS = (
    "id",
    "owner_id",
    "owner__is_active",
    "prefix",
    "name",
    "digest",
    "previous_valid_until",
    "is_active",
    "revoked_at",
    "expires_at",
    "allowed_models",
    "allowed_routes",
    "rpm_limit",
    "tpm_limit",
    "max_concurrency",
    "budget_tokens",
    "budget_cost",
    "budget_period",
    "ip_allowlist",
)


def key_list(*, actor: User) -> QuerySet[ApiKey]:
    """The keys ``actor`` may see: their own (revoked ones included), and everyone's for staff holding
    ``keys.view_apikey`` (or ``change_apikey``; superusers hold both). ``is_staff`` alone is not enough."""
    keys = ApiKey.objects.all()
    if not staff_has_model_perm(actor, "view", ApiKey):
        keys = keys.filter(owner=actor)
    return keys.order_by("-created_at", "-id")


def key_record_by_digest(*, digest: str) -> KeyRecord | None:
    """The verification record for a presented secret's digest, or None when no key has it (any more).

    A key's previous digest (kept after a rotation with grace) matches too, until its deadline.
    """
    rows = list(ApiKey.objects.filter(Q(digest=digest) | Q(previous_digest=digest)).values(*_RECORD_FIELDS)[:1])
    if not rows:
        return None
    row: dict[str, Any] = rows[0]
    valid_until: float | None = None
    if row["digest"] != digest:
        valid_until = row["previous_valid_until"].timestamp()
        if valid_until <= timezone.now().timestamp():
            return None
    refusal: KeyStateRefusal = ""
    if row["revoked_at"] is not None:
        refusal = "revoked"
    elif not row["is_active"] or not row["owner__is_active"]:
        refusal = "inactive"
    budget_cost: Decimal | None = row["budget_cost"]
    policy = KeyPolicy(
        key_id=row["id"],
        owner_id=row["owner_id"],
        prefix=row["prefix"],
        name=row["name"],
        allowed_models=frozenset(row["allowed_models"] or ()),
        allowed_routes=frozenset(row["allowed_routes"] or ()),
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        max_concurrency=row["max_concurrency"],
        budget_tokens=row["budget_tokens"],
        budget_cost=budget_cost,
        budget_period=row["budget_period"],
    )
    return KeyRecord(
        policy=policy,
        refusal=refusal,
        expires_at=row["expires_at"].timestamp() if row["expires_at"] is not None else None,
        valid_until=valid_until,
        ip_allowlist=tuple(row["ip_allowlist"] or ()),
    )


def key_model_scopes_for_user(*, user_id: int) -> tuple[bool, set[str]]:
    """Which public models the user's usable keys may call.

    ``(True, set())`` when one of them may call every model (empty ``allowed_models``); otherwise
    ``(False, names)``, the union of their ``allowed_models``. Disabled, revoked and expired keys
    count for nothing, so a user without a usable key gets ``(False, set())``.
    """
    return _scopes_for_user(user_id, "allowed_models")


def key_route_scopes_for_user(*, user_id: int) -> tuple[bool, set[str]]:
    """Which gateway routes the user's usable keys may call: like ``key_model_scopes_for_user``, over
    ``allowed_routes``."""
    return _scopes_for_user(user_id, "allowed_routes")


def _scopes_for_user(user_id: int, field: str) -> tuple[bool, set[str]]:
    scopes = ApiKey.objects.filter(owner_id=user_id, is_active=True, revoked_at__isnull=True).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now())
    )
    names: set[str] = set()
    for allowed in scopes.values_list(field, flat=True):
        if not allowed:
            return True, set()
        names.update(str(name) for name in allowed)
    return False, names


def key_names_for_owner(*, owner_id: int) -> set[str]:
    """Names of the keys ``owner_id`` holds (revoked ones included)."""
    return set(ApiKey.objects.filter(owner_id=owner_id).values_list("name", flat=True))
