"""Encryption at rest for upstream credentials (Fernet: AES-128-CBC + HMAC-SHA256).

The key comes from ``FIELD_ENCRYPTION_KEY`` (a Fernet key) or, when unset, is
derived from ``SECRET_KEY``, so rotating SECRET_KEY without setting
FIELD_ENCRYPTION_KEY makes stored upstream keys unreadable: set it in production.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


@lru_cache(maxsize=4)
def _fernet(configured: str, secret_key: str) -> Fernet:
    if configured:
        return Fernet(configured.encode())
    derived = hashlib.sha256(b"apiforge-field-encryption:" + secret_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(derived))


def _box() -> Fernet:
    return _fernet(settings.FIELD_ENCRYPTION_KEY, settings.SECRET_KEY)


def secret_encrypt(plaintext: str) -> str:
    """Ciphertext (text) of ``plaintext``; the empty string stays empty."""
    if not plaintext:
        return ""
    return _box().encrypt(plaintext.encode()).decode()


def secret_decrypt(ciphertext: str) -> str:
    """Plaintext of a value made by ``secret_encrypt``; empty when it cannot be read."""
    if not ciphertext:
        return ""
    try:
        return _box().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        return ""
