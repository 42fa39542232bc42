"""Reads of the admin Playground: the keys a staff member may try with the models each may call, and what the
ledger recorded for a call made from the page."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from gateway_stats.models import UsageRecord
from keys import selectors as keys_selectors
from proxy.models import Model

if TYPE_CHECKING:
    from accounts.models import User


@dataclass(frozen=True, slots=True)
class PlaygroundKey:
    """A key the user may try: its id, a label (name, prefix, owner) and the active models it may call."""

    key_id: int
    label: str
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PlaygroundUsage:
    """A call's ledger row: status, tokens and the cost recorded (at the prices in force at call time)."""

    request_id: str
    status: int
    error_code: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Decimal

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "status": self.status,
            "error_code": self.error_code,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            # As the ledger holds it, without trailing zeros: a tiny cost reads as itself (0.000006).
            "cost": format(self.cost.normalize(), "f") if self.cost else "0",
        }


def playground_keys(*, actor: User) -> list[PlaygroundKey]:
    """The keys ``actor`` may use (``keys.selectors.key_list_usable``: any usable key for staff holding
    ``keys.view_apikey``, otherwise their own), newest first, each with the active models it may call (all of
    them when the key has no model restriction). Two queries whatever the number of keys."""
    active = list(Model.objects.filter(is_active=True).order_by("name").values_list("name", flat=True))
    keys = []
    for key in keys_selectors.key_list_usable(actor=actor):
        allowed = set(key.allowed_models or ())
        models = tuple(name for name in active if not allowed or name in allowed)
        label = f"{key.name} ({key.prefix}…, {key.owner.get_username()})"
        keys.append(PlaygroundKey(key_id=key.pk, label=label, models=models))
    return keys


def playground_key(*, actor: User, key_id: int) -> Any | None:
    """The key ``key_id`` if ``actor`` may use it now (see ``playground_keys``), else None."""
    return keys_selectors.key_list_usable(actor=actor).filter(pk=key_id).first()


def playground_usage(*, actor: User, request_id: str) -> PlaygroundUsage | None:
    """The ledger row of the call ``request_id`` when it was made with a key ``actor`` may see, else None
    (also while the ledger has not received it yet: its write trails the answer)."""
    visible = keys_selectors.key_list(actor=actor).values("pk")
    row = (
        UsageRecord.objects.filter(request_id=request_id, key_id__in=visible)
        .order_by("-started_at")
        .values_list(
            "request_id",
            "status",
            "error_code",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost",
        )
        .first()
    )
    return None if row is None else PlaygroundUsage(*row)
