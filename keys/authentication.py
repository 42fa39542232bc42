"""DRF authentication with our API keys, for the management endpoints a service calls with its own key
(the route registry: ``/api/register``, heartbeats).

The key comes as ``Authorization: Bearer <key>``, ``x-api-key`` or ``api-key``, as on the proxy. A Bearer value
that is not shaped like one of our keys (a JWT) is left to the next authentication class, so a view lists this
class *before* JWT where keys apply, and access tokens keep working there. Verification is the proxy's
(``keys.verification.key_verify``: cached, IP allowlist and expiry included). On success ``request.user`` is
the key's owner and ``request.auth`` the key's ``KeyPolicy``; an unknown key is a 401, a disabled, revoked or
expired key, or one used from an address it does not allow, a 403.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from apiforge.client_ip import client_ip
from apiforge.errors import WWW_AUTHENTICATE
from keys.credentials import presented_key
from keys.policy import KeyPolicy
from keys.verification import KeyRefused, key_verify


class ApiKeyAuthentication(BaseAuthentication):
    """``request.user`` = the key's owner, ``request.auth`` = its ``KeyPolicy``; no key: None (next class)."""

    def authenticate(self, request: Request) -> tuple[Any, KeyPolicy] | None:
        secret = presented_key(request)
        if secret is None:
            return None
        try:
            policy = key_verify(secret, client_ip(request))
        except KeyRefused as refused:
            if refused.reason == "unknown":
                raise exceptions.AuthenticationFailed(str(refused), code="invalid_api_key") from None
            raise exceptions.PermissionDenied(str(refused), code=f"api_key_{refused.reason}") from None
        owner = get_user_model().objects.filter(pk=policy.owner_id, is_active=True).first()
        if owner is None:  # the verification cache had not heard of the owner's deactivation yet
            raise exceptions.PermissionDenied("This API key is disabled.", code="api_key_inactive")
        return owner, policy

    def authenticate_header(self, request: Request) -> str:
        return WWW_AUTHENTICATE


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """How the OpenAPI document describes ``ApiKeyAuthentication``: a Bearer key, or the x-api-key header."""

    target_class = ApiKeyAuthentication
    name = ["apiKeyBearer", "apiKeyHeader"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return [{"apiKeyBearer": []}, {"apiKeyHeader": []}]  # either one

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return [
            {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "API key (afk-...)",
                "description": "One of our API keys as a Bearer token.",
            },
            {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "One of our API keys."},
        ]
