"""Key secrets and their digests: how a secret is made and the only form in which it is stored.

A secret is ``afk-`` plus 256 bits from ``secrets`` (``token_urlsafe(32)``): the
fixed, recognisable prefix lets secret scanners find leaked keys. The database
keeps an HMAC-SHA256 of the secret under a server-side pepper (``API_KEY_PEPPER``,
by default derived from ``SECRET_KEY``), never the secret. A fast keyed hash is
right here, not a slow password hash: the secret already has 256 bits of entropy,
and the digest is computed on every proxied request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

KEY_MARKER = "afk-"
KEY_RANDOM_BYTES = 32
# What lists show so people can tell keys apart: the marker and 8 random characters (48 bits).
PREFIX_LENGTH = 12
# Anything longer cannot be one of our secrets; refusing it early keeps huge headers off the HMAC.
KEY_MAX_LENGTH = 128

_pepper: bytes | None = None


def _pepper_bytes() -> bytes:
    """The HMAC key, computed once per process (and again only when the setting changes in tests)."""
    global _pepper
    if _pepper is None:
        configured: str = settings.API_KEY_PEPPER
        if configured:
            _pepper = configured.encode()
        else:
            # A separate derivation so the pepper is never SECRET_KEY itself.
            _pepper = hashlib.sha256(b"apiforge.keys.pepper.v1:" + settings.SECRET_KEY.encode()).digest()
    return _pepper


def _pepper_reset(*, setting: str, **kwargs: Any) -> None:
    global _pepper
    if setting in {"API_KEY_PEPPER", "SECRET_KEY"}:
        _pepper = None


setting_changed.connect(_pepper_reset)


def key_secret_generate() -> str:
    """A new secret: ``afk-`` followed by 43 URL-safe characters (256 random bits)."""
    return KEY_MARKER + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def key_secret_prefix(secret: str) -> str:
    """The public part of a secret shown in lists, e.g. ``afk-AbCdEfGh``."""
    return secret[:PREFIX_LENGTH]


def key_secret_plausible(secret: str) -> bool:
    """Whether ``secret`` has the shape of one of our secrets (checked before any hashing)."""
    return secret.startswith(KEY_MARKER) and PREFIX_LENGTH < len(secret) <= KEY_MAX_LENGTH


def key_digest(secret: str) -> str:
    """The stored form of a secret: hex HMAC-SHA256 under the pepper (64 characters)."""
    return hmac.digest(_pepper_bytes(), secret.encode(), "sha256").hex()
