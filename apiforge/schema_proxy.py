"""drf-spectacular postprocessing hook: the proxy's own paths in the OpenAPI document.

``/v1/...`` (OpenAI-compatible) and ``/gw/...`` (gateway routes) are answered by the edge (``proxy.asgi``), not
by DRF views, so drf-spectacular cannot see them. This hook adds them, under tags of their own (apart from the
management API), with the API-key security schemes the proxy accepts (``Authorization: Bearer`` or
``x-api-key``; ``api-key`` too, as Azure's SDK sends it) and the OpenAI-shaped errors the proxy answers with.
The bodies are described as far as the proxy itself reads them; anything else is passed to the upstream.
"""

from __future__ import annotations

from typing import Any

PROXY_TAG = "OpenAI-compatible proxy"
GATEWAY_TAG = "Gateway routes"
OPENAI_ERROR = "OpenAIError"
TAGS: list[dict[str, str]] = [
    {"name": "auth", "description": "Register, log in (JWT), refresh, log out, who am I."},
    {"name": "keys", "description": "Your API keys (staff: everyone's): create, list, change, rotate, revoke."},
    {"name": "upstreams", "description": "Staff: the providers the proxy calls, with their encrypted credentials."},
    {"name": "models", "description": "Staff: public model names, their deployments, prices and fallbacks."},
    {"name": "routes", "description": "Generic HTTP routes of the gateway (register, lease heartbeat, change)."},
    {"name": "usage", "description": "The request log: one ledger row per call (yours, or everyone's for staff)."},
    {"name": "stats", "description": "Aggregates of the ledger: usage over time, summaries, errors."},
    {"name": "audit", "description": "Staff: who did what to which object, when, from where."},
    {
        "name": PROXY_TAG,
        "description": "What clients call with an API key through any OpenAI SDK (base URL `/v1`). Served by the "
        "gateway's edge, not by the management API: keys, rate limits, budgets and circuit breakers apply, and "
        "every call is written to the usage ledger.",
    },
    {
        "name": GATEWAY_TAG,
        "description": "Generic HTTP APIs registered as routes, under `/gw/<route path>/...`, any method; each "
        "route says whether it needs an API key, a JWT or nothing. Bodies are passed through as they are.",
    },
]

_KEY_SECURITY: list[dict[str, list[str]]] = [{"apiKeyBearer": []}, {"apiKeyHeader": []}]
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}
_REQUEST_ID = {"schema": {"type": "string"}, "description": "This call's id (as in the request log)."}
_RATE_HEADERS = {
    f"x-ratelimit-{part}-{kind}": {"schema": {"type": "string"}, "description": f"The tightest {kind} limit's {part}."}
    for kind in ("requests", "tokens")
    for part in ("limit", "remaining", "reset")
}
_ERRORS = {
    "400": "Malformed JSON or invalid fields (OpenAI-shaped error).",
    "401": "No API key, or an unknown one.",
    "403": "The key is disabled, revoked or expired, or may not use this model, route or client address.",
    "404": "Unknown model, route or path.",
    "405": "Wrong method for this path (`Allow` says which).",
    "413": "The request body is too large.",
    "429": "A rate limit or a budget of the key, its user or group (`Retry-After` says when to retry).",
    "502": "The upstream failed.",
    "503": "No healthy upstream (circuit breakers open).",
    "504": "The upstream timed out.",
}
_CHAT_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "description": "A public model name (GET /v1/models lists yours)."},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"role": {"type": "string"}, "content": {}},
                "required": ["role"],
            },
        },
        "stream": {"type": "boolean", "description": "Answer as server-sent events (`text/event-stream`)."},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "max_tokens": {"type": "integer", "minimum": 1},
    },
    "required": ["model", "messages"],
    "additionalProperties": True,
}
_COMPLETION_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "prompt": {"description": "A string or a list of strings."},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1},
    },
    "required": ["model", "prompt"],
    "additionalProperties": True,
}
_EMBEDDING_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {"model": {"type": "string"}, "input": {"description": "A string or a list of strings."}},
    "required": ["model", "input"],
    "additionalProperties": True,
}
_OPENAI_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


def _responses(statuses: tuple[str, ...], ok: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{OPENAI_ERROR}"}}}
    for status in statuses:
        responses[status] = {"description": _ERRORS[status], "content": error, "headers": {"x-request-id": _REQUEST_ID}}
        if status == "429":
            responses[status]["headers"]["Retry-After"] = {"schema": {"type": "string"}}
    return responses


def _ok(description: str, *, stream: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _OPENAI_OBJECT}}
    if stream:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "`data: {chunk}` lines ending with `data: [DONE]`."}
        }
    return {"description": description, "content": content, "headers": {"x-request-id": _REQUEST_ID, **_RATE_HEADERS}}


def _proxy_post(operation_id: str, summary: str, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "tags": [PROXY_TAG],
            "security": _KEY_SECURITY,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": _responses(
                ("400", "401", "403", "404", "405", "413", "429", "502", "503", "504"),
                _ok("The upstream's answer (OpenAI's shape), streamed when `stream` is true.", stream=stream),
            ),
        }
    }


def _paths() -> dict[str, Any]:
    model_parameter = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    route_parameter = {
        "name": "path",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The route's path and what follows it, e.g. `weather/today`.",
    }
    gateway_operation = {
        "tags": [GATEWAY_TAG],
        "summary": "Call a registered route",
        "description": "Forwarded to one of the route's targets (weighted, with health checks, circuit breakers, "
        "retries and an optional fallback); the answer is the target's, streamed. Errors of the gateway itself "
        "are OpenAI-shaped JSON.",
        "parameters": [route_parameter],
        "security": [*_KEY_SECURITY, {"jwtAuth": []}, {}],
        "responses": {
            "200": {"description": "The target's answer, as it is.", "headers": {"x-request-id": _REQUEST_ID}},
            **{
                status: body
                for status, body in _responses(("401", "403", "404", "413", "429", "502", "503", "504"), {}).items()
                if status != "200"
            },
        },
    }
    gateway = {
        method: {**gateway_operation, "operationId": f"gateway_{method}"}
        for method in ("get", "post", "put", "patch", "delete")
    }
    return {
        "/v1/chat/completions": _proxy_post("proxy_chat_completions", "Chat completion", _CHAT_BODY, stream=True),
        "/v1/completions": _proxy_post("proxy_completions", "Text completion", _COMPLETION_BODY, stream=True),
        "/v1/embeddings": _proxy_post("proxy_embeddings", "Embeddings", _EMBEDDING_BODY, stream=False),
        "/v1/models": {
            "get": {
                "operationId": "proxy_models_list",
                "summary": "The models this key may call",
                "tags": [PROXY_TAG],
                "security": _KEY_SECURITY,
                "responses": _responses(("401", "403"), _ok("`{object: list, data: [model...]}`", stream=False)),
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "proxy_models_retrieve",
                "summary": "One model",
                "tags": [PROXY_TAG],
                "parameters": [model_parameter],
                "security": _KEY_SECURITY,
                "responses": _responses(("401", "403", "404"), _ok("`{id, object: model, ...}`", stream=False)),
            }
        },
        "/gw/{path}": gateway,
    }


def proxy_paths(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """Add the proxy's and the gateway's paths, their tags and the OpenAI error shape to the document."""
    result.setdefault("paths", {}).update(_paths())
    components = result.setdefault("components", {})
    components.setdefault("schemas", {})[OPENAI_ERROR] = _ERROR_SCHEMA
    schemes = components.setdefault("securitySchemes", {})
    schemes.setdefault("apiKeyBearer", {"type": "http", "scheme": "bearer", "bearerFormat": "API key (afk-...)"})
    schemes.setdefault("apiKeyHeader", {"type": "apiKey", "in": "header", "name": "x-api-key"})
    schemes.setdefault("jwtAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    result["tags"] = TAGS
    return result
