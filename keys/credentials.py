"""Which credential a management request presents: one of our API keys, or not (a JWT, a session).

``presented_key`` finds a key where the proxy takes one (``Authorization: Bearer``, ``x-api-key``, ``api-key``);
``ManagementJwtAuthentication`` is simplejwt's authentication for the management API (``/api/``) that, given an
API key instead of a token, says which credential is expected rather than "Given token not valid for any token
type". This module imports nothing of ``apiforge.errors``: DRF loads it while it loads its own settings.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme
from rest_framework import exceptions
from rest_framework.authentication import get_authorization_header
from rest_framework.request import Request
from rest_framework_simplejwt.authentication import JWTAuthentication

from keys.hashing import key_secret_plausible

_KEY_HEADERS = ("HTTP_X_API_KEY", "HTTP_API_KEY")

API_KEY_ON_MANAGEMENT = (
    "The management API expects a JWT access token (Authorization: Bearer <access> from /auth/login) or an admin "
    "session; API keys are for the proxy (/v1/) and gateway routes (/gw/)."
)


def presented_key(request: Request) -> str | None:
    """The API key the request presents, or None (no key; a Bearer JWT is not a key)."""
    for header in _KEY_HEADERS:
        value = request.META.get(header, "").strip()
        if value:
            return str(value)
    parts = get_authorization_header(request).split()
    if len(parts) == 2 and parts[0].lower() == b"bearer":
        token = parts[1].decode("latin-1")
        if key_secret_plausible(token):
            return token
    return None


class ManagementJwtAuthentication(JWTAuthentication):
    """simplejwt's JWT authentication, naming the credential expected when an API key comes instead.

    Views that take keys (``keys.authentication.ApiKeyAuthentication``) list that class first, so a key they
    accept never reaches here.
    """

    def authenticate(self, request: Request) -> Any:
        if presented_key(request) is not None:
            raise exceptions.AuthenticationFailed(API_KEY_ON_MANAGEMENT, code="api_key_not_accepted")
        return super().authenticate(request)


class ManagementJwtScheme(SimpleJWTScheme):
    """The OpenAPI document describes ``ManagementJwtAuthentication`` as simplejwt's own ``jwtAuth`` scheme."""

    target_class = "keys.credentials.ManagementJwtAuthentication"
