"""Writes of the keys app: issue, change, disable/enable, rotate, revoke, delete, and the last-used flush.

Every write runs in a transaction, locks the key's row, is written to the audit
trail (without secrets or digests) and, once committed, invalidates the cached
verification entries of the key's digests on every process.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from gateway_stats.services import audit_record
from keys.exceptions import KNOWN_KEY_REFUSAL_CODES
from keys.hashing import key_digest, key_secret_generate, key_secret_prefix
from keys.models import ApiKey
from keys.scopes import SCOPE_FIELDS, scope_errors
from keys.verification import key_cache_invalidate_on_commit, key_usage_drain, key_usage_restore, key_usage_touch

if TYPE_CHECKING:
    from accounts.models import User
    from gateway_stats.usage import UsageEvent

AUDIT_OBJECT_TYPE = "keys.apikey"
# Fields a key's owner (or staff) may change after creation; everything else is set by a workflow.
UPDATABLE_FIELDS = frozenset(
    {
        "name",
        "is_active",
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
        "metadata",
    }
)
logger = logging.getLogger("keys.usage")

ROTATION_GRACE_MAX_S = 30 * 24 * 3600
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class KeyIssued:
    """A key and its secret, returned by create and rotate: the only time the secret is available."""

    key: ApiKey
    secret: str


# --- helpers ----------------------------------------------------------------------------------------
def _audit(
    *, key: ApiKey, action: str, actor: AbstractBaseUser | None, ip_address: str | None, changes: dict[str, Any]
) -> None:
    audit_record(
        actor=actor,
        action=action,
        object_type=AUDIT_OBJECT_TYPE,
        object_id=key.pk,
        object_repr=str(key),
        changes=changes,  # made JSON-safe by audit_record
        ip_address=ip_address,
    )


def _invalidate_on_commit(digests: Iterable[str | None]) -> None:
    # Raises CacheUnavailable (503, nothing saved) when the other workers cannot be told about this write.
    key_cache_invalidate_on_commit(digests)


def _digests(key: ApiKey) -> tuple[str | None, str | None]:
    return key.digest, key.previous_digest


def _locked(key: ApiKey) -> ApiKey:
    return ApiKey.objects.select_for_update().get(pk=key.pk)


def _normalized(field: str, value: Any) -> Any:
    """Canonical forms, so equal scopes compare equal and the proxy gets tidy values."""
    if field in {"allowed_models", "allowed_routes"} and isinstance(value, list):
        return list(dict.fromkeys(item.strip() for item in value if isinstance(item, str)))
    if field == "ip_allowlist" and isinstance(value, list):
        normalized = []
        for item in value:
            try:
                normalized.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
            except ValueError:
                normalized.append(item)  # left for the field validator to report
        return list(dict.fromkeys(normalized))
    if field == "name" and isinstance(value, str):
        return value.strip()
    return value


def _expiry_check(expires_at: datetime | None) -> None:
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "The expiry must be in the future."}, code="past")


def _clean(key: ApiKey, fields: Iterable[str] | None = None) -> None:
    """Validate the given fields (all when None; the others were valid before) with the model's
    validators, and check that the models and routes named in scopes exist (``keys.scopes``)."""
    checked = {field.name for field in ApiKey._meta.concrete_fields} if fields is None else set(fields)
    exclude = [field.name for field in ApiKey._meta.concrete_fields if field.name not in checked]
    errors: dict[str, Any] = {}
    try:
        key.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
    except ValidationError as invalid:
        errors = invalid.update_error_dict(errors)
    well_formed = {field: getattr(key, field) for field in SCOPE_FIELDS.values() if field in checked - set(errors)}
    for field, error in scope_errors(well_formed).items():
        errors.setdefault(field, []).append(error)
    if errors:
        raise ValidationError(errors)


# --- workflows --------------------------------------------------------------------------------------
@transaction.atomic
def key_create(
    *,
    owner: User,
    name: str,
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
    is_active: bool = True,
    expires_at: datetime | None = None,
    allowed_models: Sequence[str] = (),
    allowed_routes: Sequence[str] = (),
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    max_concurrency: int | None = None,
    budget_tokens: int | None = None,
    budget_cost: Decimal | None = None,
    budget_period: str = ApiKey.BudgetPeriod.MONTH,
    ip_allowlist: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> KeyIssued:
    """Issue a key for ``owner``. The secret is in the result and nowhere else, ever."""
    _expiry_check(expires_at)
    values: dict[str, Any] = {
        "name": name,
        "is_active": is_active,
        "expires_at": expires_at,
        "allowed_models": list(allowed_models),
        "allowed_routes": list(allowed_routes),
        "rpm_limit": rpm_limit,
        "tpm_limit": tpm_limit,
        "max_concurrency": max_concurrency,
        "budget_tokens": budget_tokens,
        "budget_cost": budget_cost,
        "budget_period": budget_period,
        "ip_allowlist": list(ip_allowlist),
        "metadata": dict(metadata or {}),
    }
    values = {field: _normalized(field, value) for field, value in values.items()}
    secret = key_secret_generate()
    key = ApiKey(owner=owner, prefix=key_secret_prefix(secret), digest=key_digest(secret), **values)
    _clean(key)
    key.save()
    _audit(key=key, action="key.create", actor=actor, ip_address=ip_address, changes={"owner": owner.pk, **values})
    return KeyIssued(key=key, secret=secret)


@transaction.atomic
def key_update(
    *, key: ApiKey, changes: Mapping[str, Any], actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> ApiKey:
    """Change name, scopes, limits, budgets, expiry or ``is_active``; only what differs is written and audited.

    The audit action is ``key.disable`` / ``key.enable`` when ``is_active`` is the only change.
    """
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValidationError(dict.fromkeys(sorted(unknown), "This field cannot be changed."))
    key = _locked(key)
    diff: dict[str, list[Any]] = {}
    for field, raw in changes.items():
        value = _normalized(field, raw)
        old = getattr(key, field)
        if old != value:
            diff[field] = [old, value]
            setattr(key, field, value)
    if not diff:
        return key
    if "expires_at" in diff:
        _expiry_check(key.expires_at)
    if key.is_active and key.is_revoked:
        raise ValidationError({"is_active": "A revoked key cannot be enabled again."}, code="revoked")
    _clean(key, diff)
    key.save(update_fields=[*diff, "updated_at"])
    action = "key.update"
    if set(diff) == {"is_active"}:
        action = "key.enable" if key.is_active else "key.disable"
    _audit(key=key, action=action, actor=actor, ip_address=ip_address, changes=diff)
    _invalidate_on_commit(_digests(key))
    return key


def key_disable(*, key: ApiKey, actor: AbstractBaseUser | None = None, ip_address: str | None = None) -> ApiKey:
    """Stop the key working until enabled again (no-op when already disabled)."""
    return key_update(key=key, changes={"is_active": False}, actor=actor, ip_address=ip_address)


def key_enable(*, key: ApiKey, actor: AbstractBaseUser | None = None, ip_address: str | None = None) -> ApiKey:
    """Let a disabled key work again; a revoked key cannot be enabled (``ValidationError``)."""
    return key_update(key=key, changes={"is_active": True}, actor=actor, ip_address=ip_address)


@transaction.atomic
def key_revoke(*, key: ApiKey, actor: AbstractBaseUser | None = None, ip_address: str | None = None) -> ApiKey:
    """Stop the key for good; the row stays (usage history keeps its key). Idempotent."""
    key = _locked(key)
    if key.is_revoked:
        return key
    key.revoked_at = timezone.now()
    key.is_active = False
    key.save(update_fields=["revoked_at", "is_active", "updated_at"])
    _audit(key=key, action="key.revoke", actor=actor, ip_address=ip_address, changes={"revoked_at": key.revoked_at})
    _invalidate_on_commit(_digests(key))
    return key


@transaction.atomic
def key_rotate(
    *, key: ApiKey, grace_seconds: int = 0, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> KeyIssued:
    """A new secret for the same key (same limits, scopes and history).

    The old secret keeps working for ``grace_seconds`` (0: it stops at once). Only the
    secret just replaced gets a grace period: rotating again ends an earlier one.
    """
    if not 0 <= grace_seconds <= ROTATION_GRACE_MAX_S:
        raise ValidationError({"grace_seconds": f"Must be between 0 and {ROTATION_GRACE_MAX_S}."})
    key = _locked(key)
    if key.is_revoked:
        raise ValidationError("A revoked key cannot be rotated.", code="revoked")
    old_digests = _digests(key)
    old_prefix = key.prefix
    secret = key_secret_generate()
    if grace_seconds:
        key.previous_digest = key.digest
        key.previous_valid_until = timezone.now() + timedelta(seconds=grace_seconds)
    else:
        key.previous_digest = None
        key.previous_valid_until = None
    key.digest = key_digest(secret)
    key.prefix = key_secret_prefix(secret)
    key.save(update_fields=["digest", "prefix", "previous_digest", "previous_valid_until", "updated_at"])
    _audit(
        key=key,
        action="key.rotate",
        actor=actor,
        ip_address=ip_address,
        changes={"prefix": [old_prefix, key.prefix], "grace_seconds": grace_seconds},
    )
    _invalidate_on_commit((*old_digests, key.digest))
    return KeyIssued(key=key, secret=secret)


@transaction.atomic
def key_delete(*, key: ApiKey, actor: AbstractBaseUser | None = None, ip_address: str | None = None) -> None:
    """Delete the row for good (staff, in the admin). The API's DELETE revokes instead."""
    key = _locked(key)
    digests = _digests(key)
    _audit(key=key, action="key.delete", actor=actor, ip_address=ip_address, changes={"prefix": key.prefix})
    key.delete()
    _invalidate_on_commit(digests)


def key_cache_invalidate_for_owner(*, owner_id: int) -> None:
    """After a change to a user field that verification reads (``is_active``, ``rpm_limit``, ``budget_cost``,
    ``budget_period``), drop their keys' cached entries."""
    digests = [
        digest
        for pair in ApiKey.objects.filter(owner_id=owner_id).values_list("digest", "previous_digest")
        for digest in pair
        if digest
    ]
    if digests:
        _invalidate_on_commit(digests)


# Key id -> the last use this process wrote as last_used_at (epoch seconds).
_usage_written: dict[int, float] = {}


def key_usage_forget() -> None:
    """Forget this process's record of written uses (tests; a fresh process starts empty)."""
    _usage_written.clear()


def key_usage_flush() -> int:
    """Write the uses noted by ``key_usage_touch`` as ``last_used_at``; returns the number of rows written.

    One UPDATE per key, and only when the stored value is more than a minute older,
    so a busy key costs at most one write a minute. Meant for a background thread
    (the usage emitter); on a database error the uses are put back for the next call.
    Policy caches are not invalidated: ``last_used_at`` is not part of a key's policy.
    """
    pending = key_usage_drain()
    written = 0
    remaining = dict(pending)
    resolution = LAST_USED_RESOLUTION.total_seconds()
    try:
        for key_id, used_epoch in pending.items():
            if used_epoch - _usage_written.get(key_id, float("-inf")) < resolution:
                # This process wrote it less than a minute ago: skip the statement altogether.
                del remaining[key_id]
                continue
            used_at = datetime.fromtimestamp(used_epoch, tz=UTC)
            written += (
                ApiKey.objects.filter(pk=key_id)
                .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=used_at - LAST_USED_RESOLUTION))
                .update(last_used_at=used_at)
            )
            _usage_written[key_id] = used_epoch
            del remaining[key_id]
    except BaseException:
        key_usage_restore(remaining)
        raise
    return written


def key_usage_sink(batch: Sequence[UsageEvent]) -> None:
    """The usage hand-off's sink for keys (registered in ``KeysConfig.ready()``): notes each key's use and
    writes ``last_used_at``, at most once a minute per key. Runs on the usage emitter's thread."""
    used = {
        event.key_id
        for event in batch
        if event.key_id is not None and event.error_code not in KNOWN_KEY_REFUSAL_CODES  # refused: not a use
    }
    for key_id in used:
        key_usage_touch(key_id)
    try:
        key_usage_flush()
    except Exception:
        # The uses are kept for the next flush; a late last_used_at is not worth an alarm.
        logger.warning("last_used_at not written this time; will retry", exc_info=True)
