"""Authentication: the presented key, verified from the keys' caches, and what it may use.

A credential the normal lookup refuses as unknown may still be an admin Playground token (``keys.playground``):
only then, so a real key's path is unchanged, is it unsigned and the key it is bound to applied, with all of
that key's checks, as if the key itself had been presented.
"""

from __future__ import annotations

from gateway_stats.usage import UsageEvent
from keys.exceptions import REFUSAL_CODES
from keys.playground import PLAYGROUND_TOKEN_PREFIX, PlaygroundTokenRefused, playground_token_key_id
from keys.verification import KeyPolicy, KeyRefused, key_verify_async, key_verify_by_id_async
from proxy.catalog import Catalog, ModelTarget
from proxy.edge.exchange import ProxyRequest
from proxy.errors import ProxyError, not_found

REFUSALS = {
    "unknown": (401, REFUSAL_CODES["unknown"], "Incorrect API key provided."),
    "inactive": (403, REFUSAL_CODES["inactive"], "This API key is disabled."),
    "revoked": (403, REFUSAL_CODES["revoked"], "This API key has been revoked."),
    "expired": (403, REFUSAL_CODES["expired"], "This API key has expired."),
    "ip_not_allowed": (403, REFUSAL_CODES["ip_not_allowed"], "This API key may not be used from your IP address."),
}

JWT_ON_PROXY = (
    "This endpoint expects an APIForge API key (Authorization: Bearer afk-...), not a JWT: "
    "access tokens are for the management API at /api/."
)


def _looks_like_jwt(token: str) -> bool:
    """A JWT's shape: three dot-separated parts, the first a base64url JSON object (``eyJ``)."""
    return token.startswith("eyJ") and token.count(".") == 2


async def authenticate(request: ProxyRequest, event: UsageEvent) -> KeyPolicy:
    """The policy of the presented key; a 401 or 403 ``ProxyError`` when there is none or it is refused."""
    if not request.api_key:
        raise ProxyError(
            401,
            "Missing API key: send it as 'Authorization: Bearer <key>', 'x-api-key' or 'api-key'.",
            code="missing_api_key",
        )
    try:
        policy = await key_verify_async(request.api_key, request.client_ip)
    except KeyRefused as refused:
        if refused.reason != "unknown" or not request.api_key.startswith(PLAYGROUND_TOKEN_PREFIX):
            refused_key_attribute(event, refused)
            raise _refusal(refused, request.api_key) from None
        policy = await _playground_policy(request.api_key, request.client_ip, event)
    event.key_id = policy.key_id
    event.key_prefix = policy.prefix
    event.user_id = policy.owner_id
    return policy


def refused_key_attribute(event: UsageEvent, refused: KeyRefused) -> None:
    """A known key's refused call (disabled, revoked, expired, IP not allowed) is its own row in the request
    log and its stats, so staff see who keeps calling with it; an unknown credential stays unattributed."""
    policy = refused.policy
    if policy is not None:
        event.key_id = policy.key_id
        event.key_prefix = policy.prefix
        event.user_id = policy.owner_id


def _refusal(refused: KeyRefused, api_key: str) -> ProxyError:
    status, code, message = REFUSALS.get(refused.reason, REFUSALS["unknown"])
    if refused.reason == "unknown" and _looks_like_jwt(api_key):
        message = JWT_ON_PROXY
    return ProxyError(status, message, code=code)


async def _playground_policy(token: str, client_ip: str | None, event: UsageEvent) -> KeyPolicy:
    """The policy of the key a playground token is bound to: an invalid or expired token is an unknown key
    (401, saying which), and the key is refused for what would refuse the key itself (revoked, disabled...)."""
    try:
        key_id = playground_token_key_id(token)
    except PlaygroundTokenRefused as refused:
        raise ProxyError(401, str(refused), code="invalid_api_key") from None
    try:
        return await key_verify_by_id_async(key_id, client_ip)
    except KeyRefused as refused:
        refused_key_attribute(event, refused)
        raise _refusal(refused, token) from None


def model_target(catalog: Catalog, policy: KeyPolicy, name: str) -> ModelTarget:
    """The public model ``name`` if it exists and the key may use it."""
    target = catalog.models.get(name)
    if target is None:
        raise not_found(f"The model {name!r} does not exist.", code="model_not_found")
    if not policy.allows_model(name):
        raise ProxyError(403, f"This API key may not use the model {name!r}.", code="model_not_allowed", param="model")
    return target
