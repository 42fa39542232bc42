"""JWT authentication for gateway routes with ``auth: jwt``: our own access tokens, checked without DRF.

The token is verified with PyJWT against the ``SIMPLE_JWT`` settings (signing key, algorithm, audience,
issuer, leeway, claim names) exactly as simplejwt issues it; a refresh token is refused. The user's name and
whether they are active come from a small in-process cache (``JWT_USER_TTL_S``), filled on a miss through a
reader the proxy app registers (``accounts`` rows: the hot path links no model code), so a deactivated user
is refused within that time even while their access token lives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from asgiref.sync import sync_to_async
from django.conf import settings

from apiforge.local_cache import SyncedLocalCache
from proxy.errors import ProxyError


@dataclass(frozen=True, slots=True)
class TokenUser:
    id: int
    username: str


# user id -> (username, is_active), or None for no such user (``proxy.selectors.jwt_user_row``).
UserReader = Callable[[int], "tuple[str, bool] | None"]
_user_readers: list[UserReader] = []
JWT_USER_TTL_S = 30.0
_users: SyncedLocalCache[tuple[str, bool] | None] = SyncedLocalCache("gw-jwt-users", ttl=JWT_USER_TTL_S)
_MISSING: Any = object()


def jwt_user_reader_register(reader: UserReader) -> None:
    _user_readers[:] = [reader]


def _invalid(message: str = "The access token is invalid or expired.") -> ProxyError:
    return ProxyError(401, message, code="invalid_token")


def _claims(token: str) -> dict[str, Any]:
    config: dict[str, Any] = getattr(settings, "SIMPLE_JWT", {})
    algorithm = config.get("ALGORITHM", "HS256")
    key = config.get("VERIFYING_KEY") or config.get("SIGNING_KEY") or settings.SECRET_KEY
    leeway = config.get("LEEWAY", 0)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=config.get("AUDIENCE"),
            issuer=config.get("ISSUER"),
            leeway=leeway.total_seconds() if hasattr(leeway, "total_seconds") else leeway,
            options={"require": ["exp"], "verify_aud": config.get("AUDIENCE") is not None},
        )
    except jwt.PyJWTError:
        raise _invalid() from None
    if claims.get(config.get("TOKEN_TYPE_CLAIM", "token_type")) != "access":
        raise _invalid("An access token is required (this is another kind of token).")
    return claims


async def jwt_authenticate(authorization: bytes | None) -> TokenUser:
    """The user of the ``Authorization: Bearer <access token>`` header; a 401 ``ProxyError`` otherwise."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        raise ProxyError(
            401,
            "This route needs a JWT access token: send 'Authorization: Bearer <access token>'.",
            code="missing_token",
        )
    claims = _claims(authorization[7:].strip().decode("latin-1"))
    user_id = claims.get(getattr(settings, "SIMPLE_JWT", {}).get("USER_ID_CLAIM", "user_id"))
    try:
        user_id = int(user_id)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _invalid() from None
    cache_key = str(user_id)
    row = _users.get(cache_key, _MISSING)
    if row is _MISSING:
        if not _user_readers:
            raise RuntimeError("No JWT user reader registered: is the proxy app installed?")
        row = await sync_to_async(_user_readers[0])(user_id)
        _users.set(cache_key, row)
    if row is None or not row[1]:
        raise _invalid("The user of this token does not exist or is inactive.")
    return TokenUser(id=user_id, username=row[0])
