"""Domain errors of the keys app."""

from __future__ import annotations

from typing import Literal

RefusalReason = Literal["unknown", "inactive", "revoked", "expired", "ip_not_allowed"]

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

    def __init__(self, reason: RefusalReason) -> None:
        super().__init__(_MESSAGES[reason])
        self.reason = reason
