"""Values that cross layers: a key's policy (what the proxy enforces) and the record verification caches."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

BudgetPeriod = Literal["day", "month", "total"]
# The refusal a key's own state decides; "" means none (expiry and IP are checked per request).
KeyStateRefusal = Literal["", "inactive", "revoked"]


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """What a verified key may do. Empty ``allowed_models`` / ``allowed_routes`` mean all."""

    key_id: int
    owner_id: int
    prefix: str
    name: str
    allowed_models: frozenset[str]
    allowed_routes: frozenset[str]
    rpm_limit: int | None
    tpm_limit: int | None
    max_concurrency: int | None
    budget_tokens: int | None
    budget_cost: Decimal | None
    budget_period: BudgetPeriod
    # The owner's own limits (``accounts.User``), shared by all their keys: a developer with many keys cannot
    # multiply their quota.
    user_rpm_limit: int | None = None
    user_budget_cost: Decimal | None = None
    user_budget_period: BudgetPeriod = "month"

    @property
    def limited(self) -> bool:
        """Whether any rate limit, concurrency limit or budget applies to this key's calls."""
        return (
            self.rpm_limit is not None
            or self.tpm_limit is not None
            or self.max_concurrency is not None
            or self.budget_tokens is not None
            or self.budget_cost is not None
            or self.user_rpm_limit is not None
            or self.user_budget_cost is not None
        )

    def allows_model(self, name: str) -> bool:
        return not self.allowed_models or name in self.allowed_models

    def allows_route(self, name: str) -> bool:
        return not self.allowed_routes or name in self.allowed_routes


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Everything verification needs about one digest, as read from the database.

    ``expires_at`` and ``valid_until`` (the end of a rotation grace period, set only
    when the digest is a key's previous one) are epoch seconds, compared per request.
    """

    policy: KeyPolicy
    refusal: KeyStateRefusal
    expires_at: float | None
    valid_until: float | None
    ip_allowlist: tuple[str, ...]
