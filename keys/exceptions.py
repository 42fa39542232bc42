"""Domain errors of the keys app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from keys.verification import KeyPolicy

RefusalReason = Literal["unknown", "inactive", "revoked", "expired", "ip_not_allowed"]

# The error code a refused call carries (proxy.edge.authenticate answers with them; the ledger keeps them).
REFUSAL_CODES: dict[RefusalReason, str] = {
    "unknown": "invalid_api_key",
    "inactive": "api_key_disabled",
    "revoked": "api_key_revoked",
    "expired": "api_key_expired",
    "ip_not_allowed": "ip_not_allowed",
}
# A known key's refusals: its call is attributed to it in the ledger, but it was not a use (no last_used_at).
KNOWN_KEY_REFUSAL_CODES = frozenset(code for reason, code in REFUSAL_CODES.items() if reason != "unknown")

_MESSAGES: dict[str, str] = {
    "unknown": "Invalid API key.",
    "inactive": "This API key is disabled.",
    "revoked": "This API key has been revoked.",
    "expired": "This API key has expired.",
    "ip_not_allowed": "This API key may not be used from this IP address.",
}


class KeyRefused(Exception):
    """A presented key may not be used; ``reason`` says why, ``str(exc)`` is safe to show the client.

    ``unknown`` covers a malformed secret, a secret no key has, and an old secret whose
    rotation grace period is over: the client cannot tell these apart (nor should it).
    """

    reason: RefusalReason

    def __init__(self, reason: RefusalReason, policy: KeyPolicy | None = None) -> None:
        super().__init__(_MESSAGES[reason])
        self.reason = reason
        # The refused key's policy when the key is known (disabled, revoked, expired, IP not allowed): whose
        # key it was, for the ledger's row of the refused call. Never for ``unknown``.
        self.policy = policy
