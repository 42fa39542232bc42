"""Encryption at rest for upstream credentials (Fernet: AES-128-CBC + HMAC-SHA256): the API key and the
extra headers (``EncryptedJSONField``).

The key comes from ``FIELD_ENCRYPTION_KEY`` (a Fernet key) or, when unset, is
derived from ``SECRET_KEY``, so rotating SECRET_KEY without setting
FIELD_ENCRYPTION_KEY makes stored upstream keys unreadable: set it in production.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from django import forms
from django.conf import settings
from django.db import models

logger = logging.getLogger(__name__)


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


class EncryptedJSONField(models.TextField):
    """A JSON value stored as Fernet ciphertext (a text column), read and written as the JSON value.

    For upstream ``extra_headers``, whose values are often credentials (``OpenAI-Organization``, a gateway
    token). Rows written before encryption hold plain JSON text and are still read; the migration that
    introduced the field encrypted them. A value that cannot be decrypted (the key changed) reads as empty,
    with a warning, like ``secret_decrypt``.
    """

    description = "JSON, encrypted at rest"

    def from_db_value(self, value: str | None, expression: object, connection: object) -> Any:
        return self._decode(value)

    def to_python(self, value: Any) -> Any:
        if value is None or not isinstance(value, str):
            return value
        return self._decode(value)

    def get_prep_value(self, value: Any) -> Any:
        if value is None:
            return None
        return secret_encrypt(json.dumps(value, separators=(",", ":"), sort_keys=True))

    def value_to_string(self, obj: models.Model) -> str:
        return json.dumps(self.value_from_object(obj))

    def formfield(self, form_class: Any = None, choices_form_class: Any = None, **kwargs: Any) -> forms.Field | None:
        # A JSON editor, as for a JSONField; never the ciphertext.
        return forms.JSONField(**{"required": not self.blank, "label": self.verbose_name.capitalize(), **kwargs})

    def _decode(self, value: str | None) -> Any:
        if value is None:
            return None
        if not value:
            return self.get_default()
        if value[:1] in "{[":  # plaintext written before the field was encrypted
            return json.loads(value)
        plaintext = secret_decrypt(value)
        if not plaintext:
            logger.warning("%s: stored value cannot be decrypted with FIELD_ENCRYPTION_KEY", self.name)
            return self.get_default()
        return json.loads(plaintext)
