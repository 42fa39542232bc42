"""Reads of the keys app: the keys a user may see, the record verification needs for a digest, and what keys
have spent of their budgets (from the usage ledger)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from apiforge.permissions import staff_has_model_perm
from gateway_stats.models import UsageRecord
from keys.models import ApiKey
from keys.periods import budget_period_bounds
from keys.policy import KeyPolicy, KeyRecord, KeyStateRefusal

if TYPE_CHECKING:
    from accounts.models import User

_RECORD_FIELDS = (
    "id",
    "owner_id",
    "owner__is_active",
    "owner__rpm_limit",
    "owner__budget_cost",
    "owner__budget_period",
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
    return _record(row, valid_until)


def key_record_by_id(*, key_id: int) -> KeyRecord | None:
    """The verification record of the key ``key_id`` (as its current secret would get it), or None when there
    is no such key: for credentials bound to a key by id (``keys.playground``)."""
    rows = list(ApiKey.objects.filter(pk=key_id).values(*_RECORD_FIELDS)[:1])
    return _record(rows[0], None) if rows else None


def _record(row: dict[str, Any], valid_until: float | None) -> KeyRecord:
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
        user_rpm_limit=row["owner__rpm_limit"],
        user_budget_cost=row["owner__budget_cost"],
        user_budget_period=row["owner__budget_period"],
    )
    return KeyRecord(
        policy=policy,
        refusal=refusal,
        expires_at=row["expires_at"].timestamp() if row["expires_at"] is not None else None,
        valid_until=valid_until,
        ip_allowlist=tuple(row["ip_allowlist"] or ()),
    )


def key_list_usable(*, actor: User) -> QuerySet[ApiKey]:
    """The keys ``actor`` may make calls with from the admin (the Playground): of the keys they may see
    (``key_list``), those a call would be accepted with: active, not revoked, not expired, owner active.
    Owners are joined (their names label the keys)."""
    return (
        key_list(actor=actor)
        .filter(is_active=True, revoked_at__isnull=True, owner__is_active=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
        .select_related("owner")
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


# The ledger's precision for costs (``UsageRecord.cost``): spent and remaining amounts are shown to it.
_COST_PLACES = Decimal("1e-10")


@dataclass(frozen=True, slots=True)
class BudgetSpent:
    """A key's current budget period as the ledger sees it: what was spent, what remains of each budget
    (None when that budget is unset; never below zero) and when the period ends (None for ``total``)."""

    tokens: int
    cost: Decimal
    remaining_tokens: int | None
    remaining_cost: Decimal | None
    resets_at: datetime | None


def key_budget_spent_many(keys: Iterable[ApiKey], *, now: float | None = None) -> dict[int, BudgetSpent]:
    """What each of ``keys`` has spent in its current budget period (``keys.periods.budget_period_bounds`` at
    ``now``, default the present), summed from the usage ledger in one query whatever the number of keys.

    Each key's period is part of the query's filter (a row counts for its key only within that key's period),
    so one ``Sum`` per key, grouped by key, answers every period at once.
    """
    keys = list(keys)
    bounds = {period: budget_period_bounds(period, now) for period in {key.budget_period for key in keys}}
    condition = Q()
    for period, (start, end) in bounds.items():
        ids = [key.pk for key in keys if key.budget_period == period]
        within = Q()
        if period != "total":
            within = Q(
                started_at__gte=datetime.fromtimestamp(start, UTC), started_at__lt=datetime.fromtimestamp(end, UTC)
            )
        condition |= Q(key_id__in=ids) & within
    sums: dict[int, tuple[int, Decimal]] = {}
    if keys:
        rows = (
            UsageRecord.objects.filter(condition)
            .order_by()
            .values("key_id")
            .annotate(tokens=Sum("total_tokens"), cost=Sum("cost"))
        )
        sums = {row["key_id"]: (row["tokens"] or 0, row["cost"] or Decimal(0)) for row in rows}
    spent: dict[int, BudgetSpent] = {}
    for key in keys:
        tokens, cost = sums.get(key.pk, (0, Decimal(0)))
        cost = Decimal(cost).quantize(_COST_PLACES)
        end = bounds[key.budget_period][1]
        spent[key.pk] = BudgetSpent(
            tokens=int(tokens),
            cost=cost,
            remaining_tokens=None if key.budget_tokens is None else max(key.budget_tokens - int(tokens), 0),
            remaining_cost=None
            if key.budget_cost is None
            else max(key.budget_cost - cost, Decimal(0)).quantize(_COST_PLACES),
            resets_at=None if key.budget_period == "total" else datetime.fromtimestamp(end, UTC),
        )
    return spent


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """A usable key's budgets (``budget_tokens`` and/or ``budget_cost`` per ``budget_period``)."""

    key_id: int
    budget_tokens: int | None
    budget_cost: Decimal | None
    budget_period: str


def key_budgets() -> list[KeyBudget]:
    """Every key that can still spend (active, not revoked, not expired) and has a budget, by id."""
    rows = (
        ApiKey.objects.filter(is_active=True, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
        .filter(Q(budget_tokens__isnull=False) | Q(budget_cost__isnull=False))
        .order_by("id")
        .values_list("id", "budget_tokens", "budget_cost", "budget_period")
    )
    return [KeyBudget(key_id, tokens, cost, period) for key_id, tokens, cost, period in rows]
