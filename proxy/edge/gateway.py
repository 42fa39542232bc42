"""The generic gateway under ``/gw/``: match a route, authenticate, pick a target, forward, stream back.

Stages (the ``/v1/`` pipeline's, with a matcher and a forwarder of their own):

- match (``proxy.gateway_catalog.route_match``): longest prefix, then method (405 with ``Allow``), then host;
  a version from ``/gw/{version}{path}`` or ``X-API-Version``; a lease that ran out is a 404;
- authenticate: ``key`` (our API keys; the route must be in the key's ``allowed_routes``), ``jwt`` (our access
  tokens; the target gets ``X-Authenticated-User`` / ``-Id`` instead) or ``none``. Our credentials never
  reach the target, and neither do client-sent ``X-Authenticated-*`` headers;
- pick: the route's balancer (breakers and health included);
- forward: the request streams to the target (a body up to ``GATEWAY_RETRY_BUFFER_BYTES`` with a
  ``Content-Length`` is buffered so that an idempotent call can be retried on another target after a connect
  error, a timeout or a 5xx); hop-by-hop headers dropped, ``X-Forwarded-For/-Proto/-Host`` and
  ``x-request-id`` set, the route's header and path transforms applied, the query string kept;
- answer: the target's status, headers (hop-by-hop dropped, the route's response transforms, ``Deprecation``
  / ``Sunset`` for a deprecated route) and body, streamed in bounded memory; no target able to answer: the
  route's ``fallback``, else 503 with ``Retry-After``;
- admit: the route's ``rate_limit_rpm`` (per key, per user for ``jwt``, per client IP for ``none``) and the key's
  own requests and concurrency limits (``proxy.edge.admit``); a refusal is a 429 with ``Retry-After``;
- account: one usage event per call, like ``/v1/`` (route, target, status, bytes, latency).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import quote

import aiohttp
from django.conf import settings
from yarl import URL

from apiforge.request_id import request_id_from, request_id_var
from apiforge.unavailable import DATABASE_ERRORS
from gateway_stats.usage import UsageEvent
from keys.hashing import key_secret_plausible
from keys.verification import KeyPolicy, KeyRefused, key_verify_async
from proxy.edge import breaker
from proxy.edge.account import account
from proxy.edge.admit import Admission, admit_route
from proxy.edge.authenticate import REFUSALS, refused_key_attribute
from proxy.edge.exchange import Header, Receive, Scope, Send
from proxy.edge.jwt_auth import jwt_authenticate
from proxy.errors import ProxyError, internal_error, not_found, secret_blank, service_unavailable
from proxy.gateway_catalog import (
    LEASE_LAPSED,
    RouteEntry,
    RouteMatch,
    RouteTargetEntry,
    gateway_get_async,
    gateway_reload_lapsed,
    route_match,
)
from proxy.upstream_client import upstream_session

logger = logging.getLogger(__name__)


GATEWAY_PREFIX = "/gw"
# Never passed on, either way (RFC 9110 7.6.1), plus what we set ourselves.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-request-id",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-authenticated-user",
    b"x-authenticated-user-id",
}
_CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"api-key"})
# The server adds its own Date and Server to every answer: the target's would be sent twice (and Server names
# the software behind the gateway).
_RESPONSE_DROP = _HOP_BY_HOP | {b"x-request-id", b"date", b"server"}
# aiohttp adds Accept-Encoding (and decompresses) unless told not to: the client's own header passes instead.
_SKIP_AUTO = ("Accept-Encoding", "Accept", "User-Agent")
# An answer up to this size with a Content-Length is read whole and sent in one message (no watcher task).
_SMALL_ANSWER = 64 * 1024
_RETRY_AFTER_DEFAULT_S = 5
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def _error(error: ProxyError, request_id: bytes, extra: tuple[Header, ...] = ()) -> tuple[int, list[Header], bytes]:
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"x-request-id", request_id),
        *error.headers,
        *extra,
        (b"content-length", str(len(body)).encode()),
    ]
    return error.status, headers, body


class _Upload:
    """The request body, streamed from ASGI ``receive`` to the target, counted and bounded."""

    __slots__ = ("done", "gone", "limit", "receive", "size", "too_large")

    def __init__(self, receive: Receive, limit: int | None) -> None:
        self.receive = receive
        self.limit = limit
        self.size = 0
        self.done = False
        self.gone = False
        self.too_large = False

    async def read_all(self) -> bytes:
        parts = []
        async for chunk in self.chunks():
            parts.append(chunk)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                raise ConnectionResetError("client went away during the upload")
            chunk: bytes = message.get("body", b"")
            self.size += len(chunk)
            if self.limit is not None and self.size > self.limit:
                self.too_large = True
                raise ValueError("request body over the route's limit")
            if not message.get("more_body", False):
                self.done = True
            if chunk:
                yield chunk


def _headers_scan(raw: list[Header]) -> tuple[dict[bytes, bytes], int | None, bool]:
    """The few headers the gateway reads (last wins), the Content-Length (None: none), and chunked-ness."""
    seen: dict[bytes, bytes] = {}
    length: int | None = None
    chunked = False
    for name, value in raw:
        if name == b"content-length":
            length = int(value) if value.isdigit() and len(value) < 19 else -1
        elif name == b"transfer-encoding":
            chunked = True
        elif name in (b"host", b"x-api-version", b"authorization", b"x-api-key", b"api-key", b"x-request-id"):
            seen[name] = value
    return seen, length, chunked


def _presented_key(seen: dict[bytes, bytes]) -> str | None:
    authorization = seen.get(b"authorization")
    if authorization is not None and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip().decode("latin-1")
    value = seen.get(b"x-api-key") or seen.get(b"api-key")
    return value.strip().decode("latin-1") if value else None


async def _authenticate(
    route: RouteEntry, seen: dict[bytes, bytes], client_ip: str | None, event: UsageEvent
) -> tuple[list[Header], KeyPolicy | None]:
    """Check the route's credential; the identity headers the target receives, and the key's policy."""
    if route.auth == "key":
        secret = _presented_key(seen)
        if not secret:
            raise ProxyError(
                401,
                "This route needs an API key: send it as 'Authorization: Bearer <key>', 'x-api-key' or 'api-key'.",
                code="missing_api_key",
            )
        try:
            policy = await key_verify_async(secret, client_ip)
        except KeyRefused as refused:
            refused_key_attribute(event, refused)
            status, code, message = REFUSALS.get(refused.reason, REFUSALS["unknown"])
            raise ProxyError(status, message, code=code) from None
        event.key_id = policy.key_id
        event.key_prefix = policy.prefix
        event.user_id = policy.owner_id
        if not policy.allows_route(route.name):
            raise ProxyError(403, f"This API key may not use the route {route.name!r}.", code="route_not_allowed")
        return [], policy
    if route.auth == "jwt":
        user = await jwt_authenticate(seen.get(b"authorization"))
        event.user_id = user.id
        identity = [
            (b"x-authenticated-user", user.username.encode()),
            (b"x-authenticated-user-id", str(user.id).encode()),
        ]
        return identity, None
    return [], None


def _forward_headers(
    raw: list[Header], route: RouteEntry, scope: Scope, client_ip: str | None, identity: list[Header], request_id: bytes
) -> list[Header]:
    strip_credentials = route.auth != "none"
    headers: list[Header] = []
    forwarded_for = b""
    host = b""
    for name, value in raw:
        if name in _REQUEST_DROP:
            if name == b"host":
                host = value
            continue
        if name in _CREDENTIALS:
            # ``none`` routes pass the client's own credentials on, but never one of our keys.
            if strip_credentials or key_secret_plausible(_bearer_value(value)):
                continue
        elif name == b"x-forwarded-for":
            forwarded_for = value
            continue
        headers.append((name, value))
    if client_ip:
        forwarded_for = forwarded_for + b", " + client_ip.encode() if forwarded_for else client_ip.encode()
    if forwarded_for:
        headers.append((b"x-forwarded-for", forwarded_for))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    if host:
        headers.append((b"x-forwarded-host", host))
    headers.append((b"x-request-id", request_id))
    headers.extend(identity)
    return route.request_headers.apply(headers)


def _bearer_value(value: bytes) -> str:
    text = value.decode("latin-1").strip()
    return text[7:].strip() if text[:7].lower() == "bearer " else text


def _target_url(target: RouteTargetEntry, match: RouteMatch, query: bytes, encoded_path: bool) -> URL:
    """The target's URL: its base path, then the request's (the prefix stripped or kept, rewritten), the query."""
    route = match.route
    path = match.rest if route.strip_path else (route.path.rstrip("/") + match.rest)
    if route.rewrite is not None:
        path = route.rewrite.apply(path or "/")
    if encoded_path:  # the client percent-encoded something: encode the decoded path again (a literal % too)
        path = quote(path, safe=_PATH_SAFE)
    full = target.base_path + (path or ("" if target.base_path else "/"))
    if query:
        full += "?" + query.decode("latin-1")
    return URL(f"{target.scheme}://{target.netloc}{full}", encoded=True)


def _answer_headers(response: aiohttp.ClientResponse, route: RouteEntry, request_id: bytes) -> list[Header]:
    headers = [
        (name, value) for name, value in ((n.lower(), v) for n, v in response.raw_headers) if name not in _RESPONSE_DROP
    ]
    headers = route.response_headers.apply(headers)
    headers.append((b"x-request-id", request_id))
    headers.extend(route.deprecation_headers)
    return headers


def _unavailable(route: RouteEntry, request_id: bytes, limit_headers: list[Header]) -> tuple[int, list[Header], bytes]:
    """No target can answer: the route's fallback, else 503 with ``Retry-After`` (until the soonest half-open)."""
    if route.fallback is not None:
        fallback = route.fallback
        headers = [
            (b"content-type", fallback.content_type),
            *fallback.headers,
            (b"x-request-id", request_id),
            (b"content-length", str(len(fallback.body)).encode()),
            *route.deprecation_headers,
            *limit_headers,
        ]
        return fallback.status, headers, fallback.body
    retry_after = _RETRY_AFTER_DEFAULT_S
    now = time.time()
    waits = [view.open_until - now for t in route.targets if (view := breaker.breaker_view(t.key)).open_until]
    if waits:
        retry_after = max(1, int(min(waits) + 0.999))
    error = ProxyError(
        503,
        f"No target of the route {route.name!r} can answer now.",
        code="no_healthy_upstream",
        headers=((b"retry-after", str(retry_after).encode()),),
    )
    return _error(error, request_id, tuple(limit_headers))


async def gateway_app(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI application for ``/gw/...`` (HTTP only)."""
    raw: list[Header] = scope["headers"]
    seen, length, chunked = _headers_scan(raw)
    request_id_text = request_id_from(seen.get(b"x-request-id"))
    token = request_id_var.set(request_id_text)
    request_id = request_id_text.encode()
    method: str = scope["method"]
    client_ip = scope["client"][0] if scope.get("client") else None
    event = UsageEvent(
        request_id=request_id_text, endpoint=scope["path"], status=0, method=method, client_ip=client_ip or ""
    )
    started = time.perf_counter()
    admitted: list[Admission] = []  # the call's reservation on its limits, once admitted (``_serve``)
    try:
        try:
            await _serve(
                scope, receive, send, raw, seen, length, chunked, request_id, client_ip, event, started, admitted
            )
        except ProxyError as error:
            error.message = secret_blank(error.message, _presented_key(seen))
            event.error_code = error.code
            extra = tuple(admitted[0].headers) if admitted else ()
            await _send_whole(send, *_error(error, request_id, extra), event)
        except Exception as exc:
            failure = service_unavailable() if isinstance(exc, DATABASE_ERRORS) else internal_error()
            if not isinstance(exc, DATABASE_ERRORS):
                logger.exception("unexpected error on the gateway path")
            event.error_code = failure.code
            await _send_whole(send, *_error(failure, request_id), event)
        finally:
            if admitted:
                admitted[0].finish(event)
        account(event, started)
    finally:
        request_id_var.reset(token)


async def _send_whole(send: Send, status: int, headers: list[Header], body: bytes, event: UsageEvent) -> None:
    event.status = status
    event.response_bytes = len(body)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _serve(
    scope: Scope,
    receive: Receive,
    send: Send,
    raw: list[Header],
    seen: dict[bytes, bytes],
    length: int | None,
    chunked: bool,
    request_id: bytes,
    client_ip: str | None,
    event: UsageEvent,
    started: float,
    admitted: list[Admission],
) -> None:
    method = event.method
    gateway = await gateway_get_async()
    version = seen.get(b"x-api-version")
    path = scope["path"][len(GATEWAY_PREFIX) :]
    host = seen.get(b"host", b"").decode("latin-1")
    version_text = version.decode("latin-1") if version else None
    found = route_match(gateway, path, method, host, version_text, time.time())
    if found is LEASE_LAPSED:
        reloaded = await gateway_reload_lapsed()  # renewed by a heartbeat since this worker loaded it?
        if reloaded is not None:
            found = route_match(reloaded, path, method, host, version_text, time.time())
    if found is None or found is LEASE_LAPSED:
        raise not_found("No gateway route matches this path.", code="route_not_found")
    if isinstance(found, tuple):
        allow = ", ".join(found).encode()
        raise ProxyError(
            405, f"The method {method} is not allowed here.", code="method_not_allowed", headers=((b"allow", allow),)
        )
    match = cast(RouteMatch, found)
    route = match.route
    event.route = route.name
    identity, policy = await _authenticate(route, seen, client_ip, event)
    admission = await admit_route(
        route.name, route.rate_limit_rpm, policy, event.user_id if route.auth == "jwt" else None, client_ip
    )
    limit_headers: list[Header] = []
    if admission is not None:
        admitted.append(admission)
        limit_headers = admission.headers
    if length == -1 or (route.max_body_bytes is not None and length is not None and length > route.max_body_bytes):
        raise ProxyError(413, "The request body is larger than this route allows.", code="request_too_large")
    upload = _Upload(receive, route.max_body_bytes)
    has_body = chunked or bool(length)
    body: bytes | AsyncIterator[bytes] | None = None
    retryable = route.retryable(method)
    if not has_body:
        upload.done = True
    elif length is not None and length <= settings.GATEWAY_RETRY_BUFFER_BYTES:
        try:
            body = await upload.read_all()
        except ValueError:
            raise ProxyError(
                413, "The request body is larger than this route allows.", code="request_too_large"
            ) from None
        except ConnectionResetError:
            event.status, event.error_code = 499, "client_disconnected"
            return
    else:
        body = upload.chunks()
        retryable = False  # a streamed body can be sent once
    event.request_bytes = length if length and length > 0 else 0
    headers = _forward_headers(raw, route, scope, client_ip, identity, request_id)
    if length is not None and length > 0:
        headers.append((b"content-length", str(length).encode()))
    query: bytes = scope.get("query_string", b"")
    attempts = 1 + (route.retries if retryable else 0)
    tried: set[str] = set()
    last_failure: ProxyError | None = None
    target = route.balancer.pick(tried)
    stale_retried = False
    attempt = -1
    while target is not None and attempt + 1 < attempts:
        attempt += 1
        tried.add(target.key)
        event.upstream = target.netloc
        call_started = time.perf_counter()
        try:
            response = await upstream_session().request(
                method,
                _target_url(target, match, query, b"%" in scope.get("raw_path", b"")),
                data=body,
                headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
                timeout=route.client_timeout,
                allow_redirects=False,
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            elapsed = time.perf_counter() - call_started
            resendable = body is None or isinstance(body, bytes)  # a streamed body can be sent once only
            if isinstance(exc, aiohttp.ServerDisconnectedError) and not stale_retried and resendable:
                # Most often a pooled keep-alive connection the target had just closed (servers drop idle ones
                # after a few seconds) and the request never reached it: sent again once, on a new connection,
                # whatever the method; no verdict on the target.
                stale_retried = True
                route.balancer.finished(target, ok=None, elapsed_s=elapsed)
                tried.discard(target.key)
                target = route.balancer.pick(tried)
                attempt -= 1  # this try does not count
                continue
            route.balancer.finished(target, ok=False, elapsed_s=elapsed)
            if upload.too_large:
                raise ProxyError(
                    413, "The request body is larger than this route allows.", code="request_too_large"
                ) from None
            if upload.gone:
                event.status, event.error_code = 499, "client_disconnected"
                return
            last_failure = _call_failure(exc, route.name)
            target = route.balancer.pick(tried) if attempt + 1 < attempts else None
            continue
        except BaseException:  # cancelled (the server is stopping) or a bug: no verdict on the target
            route.balancer.finished(target, ok=None, elapsed_s=time.perf_counter() - call_started)
            raise
        if response.status >= 500 and attempt + 1 < attempts:
            # Another target gets the call if there is one; else this answer is the client's.
            following = route.balancer.pick(tried)
            if following is not None:
                route.balancer.finished(target, ok=False, elapsed_s=time.perf_counter() - call_started)
                response.release()
                last_failure, target = None, following
                continue
        await _relay(
            response, route, target, request_id, receive, send, event, started, call_started, upload, limit_headers
        )
        return
    if last_failure is not None and route.fallback is None:
        raise last_failure
    status, answer_headers, answer = _unavailable(route, request_id, limit_headers)
    if status == 503:
        event.error_code = "no_healthy_upstream"
    await _send_whole(send, status, answer_headers, answer, event)


def _call_failure(exc: BaseException, route: str) -> ProxyError:
    if isinstance(exc, TimeoutError):
        return ProxyError(504, f"The target of the route {route!r} did not answer in time.", code="upstream_timeout")
    return ProxyError(502, f"The target of the route {route!r} could not be reached.", code="upstream_unreachable")


async def _relay(
    response: aiohttp.ClientResponse,
    route: RouteEntry,
    target: RouteTargetEntry,
    request_id: bytes,
    receive: Receive,
    send: Send,
    event: UsageEvent,
    started: float,
    call_started: float,
    upload: _Upload,
    limit_headers: list[Header],
) -> None:
    """Pass the target's answer on: whole when small and sized, else streamed (the client leaving closes it)."""
    status = response.status
    event.status = status
    ok: bool | None = status < 500
    event.ttfb_ms = (time.perf_counter() - started) * 1000
    headers = _answer_headers(response, route, request_id)
    headers.extend(limit_headers)
    length = response.content_length
    try:
        if length is not None and length <= _SMALL_ANSWER:
            try:
                body = await response.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                ok = False
                raise _call_failure(exc, route.name) from None
            event.response_bytes = len(body)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        watcher = asyncio.create_task(_watch_disconnect(receive, response)) if upload.done else None
        broke_off = False
        try:
            async for chunk in response.content.iter_any():
                event.response_bytes += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (TimeoutError, aiohttp.ClientError):
            broke_off = True
        finally:
            if watcher is not None:
                watcher.cancel()
        if watcher is not None and watcher.done() and not watcher.cancelled():
            # The client went away (the watcher closed the target's answer): no verdict on the target.
            event.status, event.error_code, ok = 499, "client_disconnected", None
        elif broke_off:
            # The status is out: all the client can be told is that the body ends short.
            event.error_code, ok = "upstream_broke_off", False
        await send({"type": "http.response.body", "body": b""})
    finally:
        response.release()
        route.balancer.finished(target, ok=ok, elapsed_s=time.perf_counter() - call_started)


async def _watch_disconnect(receive: Receive, response: aiohttp.ClientResponse) -> None:
    message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()
    response.close()
