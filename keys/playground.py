"""Playground tokens: short-lived stand-ins for a key whose secret nobody knows any more.

Keys are stored as digests only, so the admin's Playground cannot send a key's secret. Instead it asks the
server for a token bound to the key's id (``playground_token_mint``): ``afpg_`` plus the id, a random nonce (no
two tokens alike, even for one key within a second) and a timestamp, signed with ``SECRET_KEY`` under a salt of
its own (Django's ``TimestampSigner``), valid for ``PLAYGROUND_TOKEN_MAX_AGE_S`` (5 minutes unless set).

The proxy tries such a token only after the normal lookup has refused the credential
(``proxy.edge.authenticate``), then applies the key it is bound to with all of that key's checks
(``keys.verification.key_verify_by_id_async``): a revoked or disabled key's token is refused like the key.

No ORM here: the proxy's hot path imports this module.
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.core import signing

PLAYGROUND_TOKEN_PREFIX = "afpg_"  # noqa: S105 - a marker, not a secret
PLAYGROUND_TOKEN_MAX_AGE_S = 300
PLAYGROUND_TOKEN_SALT = "apiforge.keys.playground-token.v1"  # noqa: S105 - a salt, not a secret
_NONCE_BYTES = 6
# An id, a nonce, a base62 timestamp, a signature and their separators fit well within this; longer is not ours.
_MAX_LENGTH = 128


class PlaygroundTokenRefused(Exception):
    """A playground token that cannot be used: ``expired`` True when only its age is wrong."""

    def __init__(self, *, expired: bool) -> None:
        self.expired = expired
        if expired:
            message = (
                "This playground token has expired: playground tokens last a few minutes. "
                "Send the message again from the admin's Playground to get a new one."
            )
        else:
            message = "This playground token is invalid: get one from the admin's Playground."
        super().__init__(message)


def _signer() -> signing.TimestampSigner:
    return signing.TimestampSigner(salt=PLAYGROUND_TOKEN_SALT)


def playground_token_max_age() -> int:
    """How long a token stays valid, in seconds (``PLAYGROUND_TOKEN_MAX_AGE_S``, default 300)."""
    return int(getattr(settings, "PLAYGROUND_TOKEN_MAX_AGE_S", PLAYGROUND_TOKEN_MAX_AGE_S))


def playground_token_mint(key_id: int) -> str:
    """A new token for the key ``key_id``. The caller checks that the user may use that key."""
    return PLAYGROUND_TOKEN_PREFIX + _signer().sign(f"{key_id}.{secrets.token_urlsafe(_NONCE_BYTES)}")


def playground_token_key_id(token: str) -> int:
    """The id of the key ``token`` is bound to; ``PlaygroundTokenRefused`` when it is forged, altered or too old."""
    if not token.startswith(PLAYGROUND_TOKEN_PREFIX) or len(token) > _MAX_LENGTH:
        raise PlaygroundTokenRefused(expired=False)
    try:
        value = _signer().unsign(token.removeprefix(PLAYGROUND_TOKEN_PREFIX), max_age=playground_token_max_age())
    except signing.SignatureExpired:
        raise PlaygroundTokenRefused(expired=True) from None
    except (signing.BadSignature, ValueError):
        raise PlaygroundTokenRefused(expired=False) from None
    key_id = value.partition(".")[0]
    if not key_id.isdigit():
        raise PlaygroundTokenRefused(expired=False)
    return int(key_id)
