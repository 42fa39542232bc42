"""The OpenAI-compatible proxy, independent of the server interface.

``proxy_handle(ProxyRequest) -> ProxyResponse`` does the whole job: route,
authenticate (keys' cached verification), validate, pick a deployment, forward
through the pooled client with retries and fallbacks, relay streams event by
event, and hand one usage record off the request path. The lean ASGI app
(``proxy/asgi.py``) and the Django views (``proxy/views.py``) are thin adapters
around it, so both answer alike.

Hot-path rules: no ORM, no sync I/O, no per-request logging, orjson only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from django.db import InterfaceError, OperationalError

from gateway_stats.usage import UsageRecord, usage_record_emit
from keys.verification import KeyPolicy, KeyRefused, key_verify_async
from proxy.catalog import Catalog, DeploymentTarget, ModelRoute, UpstreamTarget, catalog_get_async
from proxy.errors import (
    ProxyError,
    bad_request,
    internal_error,
    not_found,
    service_unavailable,
    upstream_error,
    upstream_timeout,
)
from proxy.mock_backend import mock_answer, mock_stream
from proxy.upstream_client import upstream_session

logger = logging.getLogger(__name__)

JSON = b"application/json"
SSE = b"text/event-stream"
RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})
MODELS_PREFIX = "/v1/models/"

# path -> (endpoint, method, required body field)
POST_ENDPOINTS: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("chat/completions", "messages"),
    "/v1/completions": ("completions", "prompt"),
    "/v1/embeddings": ("embeddings", "input"),
}
STREAMABLE = frozenset({"chat/completions", "completions"})

_REFUSALS = {
    "unknown": (401, "invalid_api_key", "Incorrect API key provided."),
    "inactive": (403, "api_key_disabled", "This API key is disabled."),
    "revoked": (403, "api_key_revoked", "This API key has been revoked."),
    "expired": (403, "api_key_expired", "This API key has expired."),
    "ip_not_allowed": (403, "ip_not_allowed", "This API key may not be used from your IP address."),
}


@dataclass(slots=True)
class ProxyRequest:
    method: str
    path: str
    api_key: str | None
    client_ip: str | None
    request_id: str
    body: bytes = b""


@dataclass(slots=True)
class ProxyResponse:
    status: int
    body: bytes = b""
    content_type: bytes = JSON
    stream: AsyncIterator[bytes] | None = None
    # Called when the client goes away mid-stream: closes the upstream connection.
    abort: Callable[[], None] | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


_DATABASE_DOWN = (OperationalError, InterfaceError)
# Shortest presented key that is blanked out of an error message (shorter ones cannot be real secrets,
# and blanking them would garble the message).
_MIN_SECRET_LENGTH = 8


def _error_response(error: ProxyError, api_key: str | None = None) -> ProxyResponse:
    if api_key and len(api_key) >= _MIN_SECRET_LENGTH and api_key in error.message:
        # A client-supplied value echoed in a message (a model name, a path) may carry the key itself.
        error.message = error.message.replace(api_key, "***")
    return ProxyResponse(status=error.status, body=error.body(), headers=list(error.headers))


def _unexpected_error(exc: Exception) -> ProxyError:
    """The answer for an exception no refusal accounts for: 503 for a dependency outage, else a logged 500."""
    if isinstance(exc, _DATABASE_DOWN):
        # The database is unreachable (or its pool exhausted: psycopg_pool's PoolTimeout reaches us as an
        # OperationalError) and this answer needs it: a key or the catalog not in memory or the shared
        # cache. Not logged per request: the health check and the usage records' error_code show it.
        return service_unavailable()
    logger.exception("unexpected error on the proxy path")
    return internal_error()


async def proxy_handle(request: ProxyRequest) -> ProxyResponse:
    """Answer one proxy request; never raises (an unexpected failure is an OpenAI-shaped 500 or 503)."""
    record = UsageRecord(
        request_id=request.request_id, endpoint=request.path, status=0, client_ip=request.client_ip or ""
    )
    started = time.perf_counter()
    try:
        response = await _dispatch(request, record, started)
    except ProxyError as error:
        response = _error_response(error, request.api_key)
        record.error_code = error.code
    except Exception as exc:
        failure = _unexpected_error(exc)
        response = _error_response(failure)
        record.error_code = failure.code
    if response.stream is None:
        record.status = response.status
        record.latency_ms = (time.perf_counter() - started) * 1000
        usage_record_emit(record)
    return response


async def _dispatch(request: ProxyRequest, record: UsageRecord, started: float) -> ProxyResponse:
    path = request.path
    post = POST_ENDPOINTS.get(path)
    if post is not None:
        if request.method != "POST":
            raise ProxyError(405, f"Method {request.method} not allowed on {path}.", code="method_not_allowed")
        policy = await _authenticate(request, record)
        return await _forward(request, policy, post[0], post[1], record, started)
    if path == "/v1/models" or path.startswith(MODELS_PREFIX):
        if request.method != "GET":
            raise ProxyError(405, f"Method {request.method} not allowed on {path}.", code="method_not_allowed")
        policy = await _authenticate(request, record)
        catalog = await catalog_get_async()
        if path == "/v1/models":
            data = [_model_object(route) for name, route in sorted(catalog.models.items()) if policy.allows_model(name)]
            return ProxyResponse(200, orjson.dumps({"object": "list", "data": data}))
        name = path[len(MODELS_PREFIX) :]
        route = _model_route(catalog, policy, name)
        return ProxyResponse(200, orjson.dumps(_model_object(route)))
    raise not_found(f"Unknown path {path}.", code="unknown_url")


def _model_object(route: ModelRoute) -> dict[str, Any]:
    return {"id": route.name, "object": "model", "created": route.created, "owned_by": "apiforge"}


async def _authenticate(request: ProxyRequest, record: UsageRecord) -> KeyPolicy:
    if not request.api_key:
        raise ProxyError(
            401,
            "Missing API key: send it as 'Authorization: Bearer <key>', 'x-api-key' or 'api-key'.",
            code="missing_api_key",
        )
    try:
        policy = await key_verify_async(request.api_key, request.client_ip)
    except KeyRefused as refused:
        status, code, message = _REFUSALS.get(refused.reason, _REFUSALS["unknown"])
        raise ProxyError(status, message, code=code) from None
    record.key_id = policy.key_id
    record.user_id = policy.owner_id
    return policy


def _model_route(catalog: Catalog, policy: KeyPolicy, name: str) -> ModelRoute:
    route = catalog.models.get(name)
    if route is None:
        raise not_found(f"The model {name!r} does not exist.", code="model_not_found")
    if not policy.allows_model(name):
        raise ProxyError(403, f"This API key may not use the model {name!r}.", code="model_not_allowed", param="model")
    return route


# orjson.dumps refuses to nest deeper than this (orjson.loads accepts 1024): a deeper body could not be
# forwarded, so it is refused up front, whatever the upstream kind.
MAX_JSON_DEPTH = 254
# Optional fields checked for their JSON type (None, i.e. null or absent, passes): a wrong type is the
# client's 400 here rather than a crash in the mock or an upstream's 400 after a round trip.
_INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "n")
_NUMBER_FIELDS = ("temperature", "top_p")
_NUMBER_TYPES = (int, float)
# Upstream request headers that carry our credentials (Bearer tokens, Azure's api-key).
_SECRET_HEADERS = ("authorization", "api-key", "x-api-key")


def _parse_body(body: bytes, required: str) -> dict[str, Any]:
    if not body:
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    # Nesting deeper than MAX_JSON_DEPTH needs more brackets than that: two C-speed counts spare the
    # common body any walk, and only a bracket-heavy one pays for a trial encoding.
    if len(body) > 2 * MAX_JSON_DEPTH and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        try:
            orjson.dumps(payload)
        except orjson.JSONEncodeError:
            raise _too_deep() from None
    model = payload.get("model")
    if type(model) is not str or not model:
        raise bad_request("'model' is required and must be a non-empty string.", param="model", code="missing_model")
    value = payload.get(required)
    if value is None:
        raise bad_request(f"'{required}' is required.", param=required, code=f"missing_{required}")
    if required == "messages":
        if type(value) is not list or not value:
            raise bad_request(
                "'messages' must be a non-empty array of message objects.", param="messages", code="missing_messages"
            )
        for message in value:
            if type(message) is not dict:
                raise bad_request(
                    "Each item of 'messages' must be a message object.", param="messages", code="invalid_messages"
                )
    elif not _is_prompt(value):
        raise bad_request(
            f"'{required}' must be a string, an array of strings, an array of token ids"
            " or an array of token-id arrays.",
            param=required,
            code=f"invalid_{required}",
        )
    stream = payload.get("stream")
    if stream is not None and type(stream) is not bool:
        raise bad_request("'stream' must be a boolean.", param="stream", code="invalid_stream")
    options = payload.get("stream_options")
    if options is not None and type(options) is not dict:
        raise bad_request("'stream_options' must be an object.", param="stream_options", code="invalid_stream_options")
    for name in _INTEGER_FIELDS:
        number = payload.get(name)
        if number is not None and type(number) is not int:
            raise bad_request(f"'{name}' must be an integer.", param=name, code="invalid_type")
    for name in _NUMBER_FIELDS:
        number = payload.get(name)
        if number is not None and type(number) not in _NUMBER_TYPES:
            raise bad_request(f"'{name}' must be a number.", param=name, code="invalid_type")
    return payload


def _too_deep() -> ProxyError:
    return bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="body_too_deep")


def _is_prompt(value: Any) -> bool:
    """OpenAI's shapes for ``prompt`` and ``input``: a string, or a non-empty array of strings, of token ids
    (integers) or of non-empty token-id arrays. ``type() is`` rather than isinstance: a bool is no token id."""
    kind = type(value)
    if kind is str:
        return True
    if kind is not list or not value:
        return False
    first = type(value[0])
    if first is str or first is int:
        return all(type(item) is first for item in value)
    if first is list:
        return all(type(item) is list and item and all(type(t) is int for t in item) for item in value)
    return False


async def _forward(
    request: ProxyRequest, policy: KeyPolicy, endpoint: str, required: str, record: UsageRecord, started: float
) -> ProxyResponse:
    payload = _parse_body(request.body, required)
    catalog = await catalog_get_async()
    route = _model_route(catalog, policy, payload["model"])
    stream = bool(payload.get("stream")) and endpoint in STREAMABLE
    client_wants_usage = False
    if stream:
        options = payload.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        payload["stream_options"] = (
            {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        )
    record.model = route.name
    record.stream = stream
    last_error: ProxyError | None = None
    for candidate in _candidates(catalog, route):
        tried: set[int] = set()
        deployment = candidate.pick()
        if deployment is None:
            continue
        for _attempt in range(1 + deployment.upstream.max_retries):
            _note_deployment(record, candidate, deployment)
            try:
                if stream:
                    return await _open_stream(endpoint, payload, deployment, record, started, client_wants_usage)
                return await _call_json(endpoint, payload, deployment, record)
            except _Retryable as retry:
                last_error = retry.error
                tried.add(deployment.upstream.id)
                deployment = candidate.pick(exclude=frozenset(tried)) or deployment
    if last_error is not None:
        raise last_error
    raise ProxyError(503, f"No healthy upstream for the model {route.name!r}.", code="no_healthy_upstream")


def _candidates(catalog: Catalog, route: ModelRoute) -> list[ModelRoute]:
    """The model itself, then its fallbacks in order (unknown or inactive ones skipped)."""
    candidates = [route]
    for name in route.fallbacks:
        fallback = catalog.models.get(name)
        if fallback is not None and fallback not in candidates:
            candidates.append(fallback)
    return candidates


def _note_deployment(record: UsageRecord, route: ModelRoute, deployment: DeploymentTarget) -> None:
    record.model = route.name
    record.upstream = deployment.upstream.name
    record.upstream_model = deployment.upstream_model
    record.input_price_per_1k = route.input_price_per_1k
    record.output_price_per_1k = route.output_price_per_1k


class _Retryable(Exception):
    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


def _record_usage(record: UsageRecord, usage: Any) -> None:
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        record.prompt_tokens = prompt if isinstance(prompt, int) else 0
        record.completion_tokens = completion if isinstance(completion, int) else 0


def _upstream_failure(status: int, body: bytes, upstream: UpstreamTarget) -> ProxyError:
    """The client-facing error for an upstream error answer: its message when it is safe to show."""
    message = ""
    try:
        parsed = orjson.loads(body)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            # Some upstreams quote the credential they were sent ("Incorrect API key provided: ...").
            message = _without_upstream_secrets(error["message"], upstream)[:500]
    except orjson.JSONDecodeError:
        pass
    # 4xx answers (bad parameters, context too long) are the client's to fix: pass them on, except
    # 401/403/404, which say our upstream credentials or model mapping are wrong, not the client's.
    if 400 <= status < 500 and status not in (401, 403, 404, 407):
        return ProxyError(status, message or f"The upstream refused the request ({status}).", code="upstream_refused")
    detail = f": {message}" if message and status not in (401, 403, 407) else ""
    return upstream_error(f"The upstream {upstream.name!r} answered {status}{detail}")


def _without_upstream_secrets(message: str, upstream: UpstreamTarget) -> str:
    """``message`` (an upstream's own error text) with our credentials for that upstream blanked out."""
    for name in _SECRET_HEADERS:
        value = upstream.headers.get(name)
        if value:
            secret = value[7:] if value[:7].lower() == "bearer " else value
            if len(secret) >= _MIN_SECRET_LENGTH and secret in message:
                message = message.replace(secret, "***")
    return message


def _upstream_body(payload: dict[str, Any], deployment: DeploymentTarget) -> bytes:
    payload["model"] = deployment.upstream_model
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:  # _parse_body's depth check should have caught it: never a 500 for it
        raise _too_deep() from None


async def _call_json(
    endpoint: str, payload: dict[str, Any], deployment: DeploymentTarget, record: UsageRecord
) -> ProxyResponse:
    upstream = deployment.upstream
    if upstream.kind == "mock":
        answer = mock_answer(endpoint, payload, deployment.upstream_model)
        _record_usage(record, answer.get("usage"))
        return ProxyResponse(200, orjson.dumps(answer))
    data = _upstream_body(payload, deployment)
    try:
        async with upstream_session().post(
            upstream.urls[endpoint],
            data=data,
            headers=upstream.headers,
            timeout=upstream.timeout,
            allow_redirects=False,
        ) as response:
            body = await response.read()
            status = response.status
    except TimeoutError:
        raise upstream_timeout(upstream.name) from None
    except aiohttp.ClientError as exc:
        raise _Retryable(
            upstream_error(f"Could not reach the upstream {upstream.name!r} ({type(exc).__name__}).")
        ) from None
    if status != 200:
        error = _upstream_failure(status, body, upstream)
        if status in RETRYABLE_STATUSES:
            raise _Retryable(error)
        raise error
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise upstream_error(f"The upstream {upstream.name!r} answered with invalid JSON.") from None
    if isinstance(parsed, dict):
        _record_usage(record, parsed.get("usage"))
    return ProxyResponse(200, body)


async def _open_stream(
    endpoint: str,
    payload: dict[str, Any],
    deployment: DeploymentTarget,
    record: UsageRecord,
    started: float,
    client_wants_usage: bool,
) -> ProxyResponse:
    """Open the upstream stream (retryable until here) and return a response relaying it."""
    upstream = deployment.upstream
    if upstream.kind == "mock":
        relay = _relay(mock_stream(endpoint, payload, deployment.upstream_model), record, started, client_wants_usage)
        return ProxyResponse(200, content_type=SSE, stream=relay)
    data = _upstream_body(payload, deployment)
    try:
        response = await upstream_session().post(
            upstream.urls[endpoint],
            data=data,
            headers=upstream.headers,
            timeout=upstream.stream_timeout,
            allow_redirects=False,
        )
    except TimeoutError:
        raise upstream_timeout(upstream.name) from None
    except aiohttp.ClientError as exc:
        raise _Retryable(
            upstream_error(f"Could not reach the upstream {upstream.name!r} ({type(exc).__name__}).")
        ) from None
    if response.status != 200:
        try:
            body = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            response.release()
        error = _upstream_failure(response.status, body, upstream)
        if response.status in RETRYABLE_STATUSES:
            raise _Retryable(error)
        raise error
    relay = _relay(_upstream_pieces(response, upstream.name), record, started, client_wants_usage)

    def abort() -> None:
        record.status = 499
        record.error_code = "client_disconnected"
        response.close()

    return ProxyResponse(200, content_type=SSE, stream=relay, abort=abort)


async def _upstream_pieces(response: aiohttp.ClientResponse, upstream: str) -> AsyncIterator[bytes]:
    """Bytes from the upstream as they arrive; the connection is closed early if we stop early."""
    finished = False
    try:
        async for piece in response.content.iter_any():
            yield piece
        finished = True
    except TimeoutError:
        raise upstream_timeout(upstream) from None
    except aiohttp.ClientError:
        raise upstream_error(f"The upstream {upstream!r} broke off the stream.") from None
    finally:
        if finished:
            response.release()
        else:
            response.close()


def _usage_in(events: bytes, record: UsageRecord, keep_usage_chunk: bool) -> bytes:
    """Note the usage carried by complete SSE ``events``; drop the usage-only chunk unless the client asked.

    Only the last event naming ``"usage"`` is parsed: upstreams that send ``"usage": null`` on every chunk
    (or running totals) put the figure that counts last, and parsing one event instead of all is what keeps
    a stream's relay cheap.
    """
    at = events.rfind(b'"usage"')
    if at < 0:
        return events
    start = events.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = events.find(b"\n\n", at)
    end = len(events) if end < 0 else end + 2
    event = events[start:end].rstrip(b"\n")
    if not event.startswith(b"data: {"):
        return events
    try:
        chunk = orjson.loads(event[6:])
    except orjson.JSONDecodeError:
        return events
    if isinstance(chunk, dict) and chunk.get("usage"):
        _record_usage(record, chunk["usage"])
        if not keep_usage_chunk and not chunk.get("choices"):
            return events[:start] + events[end:]
    return events


async def _relay(
    pieces: AsyncIterator[bytes], record: UsageRecord, started: float, client_wants_usage: bool
) -> AsyncIterator[bytes]:
    """Pass complete SSE events on as they arrive, noting usage; always emits the usage record."""
    buffer = b""
    record.status = 200
    try:
        async for piece in pieces:
            if not record.ttfb_ms:
                record.ttfb_ms = (time.perf_counter() - started) * 1000
            if b"\r" in piece:
                piece = piece.replace(b"\r\n", b"\n")
            buffer += piece
            end = buffer.rfind(b"\n\n")
            if end < 0:
                continue
            events, buffer = buffer[: end + 2], buffer[end + 2 :]
            if b'"usage"' in events:
                events = _usage_in(events, record, client_wants_usage)
            if events:
                yield events
        if buffer.strip():
            yield _usage_in(buffer, record, client_wants_usage) if b'"usage"' in buffer else buffer
    except ProxyError as error:
        if record.error_code != "client_disconnected":
            record.status = error.status
            record.error_code = error.code
            yield error.sse_event()
    except Exception:
        # The answer has started (200 is sent): end it with an error event rather than a dropped connection.
        logger.exception("unexpected error while relaying a stream")
        failure = internal_error()
        record.status = failure.status
        record.error_code = failure.code
        yield failure.sse_event()
    except (asyncio.CancelledError, GeneratorExit):
        record.status = 499
        record.error_code = "client_disconnected"
        raise
    finally:
        record.latency_ms = (time.perf_counter() - started) * 1000
        usage_record_emit(record)
