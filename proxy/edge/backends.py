"""Backends: how an upstream of each kind is called. ``BACKENDS`` maps ``Upstream.kind`` to one.

A backend answers one call with an ``UpstreamAnswer`` (a JSON body with its usage, or a stream of
bytes) or raises an ``UpstreamError`` (``proxy/errors.py``). Today's kinds: ``openai`` (any
OpenAI-compatible HTTP server, through the pooled client) and ``mock`` (answers made locally); the
generic gateway's routes add ``http``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.catalog import DeploymentTarget, UpstreamTarget
from proxy.edge.payload import too_deep
from proxy.errors import (
    UpstreamBrokeOff,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnreachable,
    secret_blank,
)
from proxy.mock_backend import mock_answer, mock_stream
from proxy.upstream_client import upstream_session

# Upstream request headers that carry our credentials (Bearer tokens, Azure's api-key).
_SECRET_HEADERS = ("authorization", "api-key", "x-api-key")


@dataclass(slots=True)
class UpstreamAnswer:
    """A 200 from the upstream: ``body`` and its ``usage`` object, or ``pieces`` of a stream to relay."""

    body: bytes = b""
    usage: Any = None
    pieces: AsyncIterator[bytes] | None = None
    # Closes the upstream connection of a stream at once (the client went away).
    close: Callable[[], None] | None = None


class Backend(Protocol):
    async def send(
        self, endpoint: str, payload: dict[str, Any], deployment: DeploymentTarget, stream: bool
    ) -> UpstreamAnswer:
        """Call the upstream; raise an ``UpstreamError`` when it fails. ``payload`` has been validated."""
        ...


class OpenAIBackend:
    """An OpenAI-compatible HTTP upstream: one POST, JSON or SSE, through the pooled client."""

    async def send(
        self, endpoint: str, payload: dict[str, Any], deployment: DeploymentTarget, stream: bool
    ) -> UpstreamAnswer:
        upstream = deployment.upstream
        payload["model"] = deployment.upstream_model
        try:
            data = orjson.dumps(payload)
        except orjson.JSONEncodeError:  # payload_parse's depth check should have caught it: never a 500 for it
            raise too_deep() from None
        try:
            try:
                response = await _post(upstream, endpoint, data, stream)
            except aiohttp.ServerDisconnectedError:
                # Most often a pooled keep-alive connection the upstream had just dropped (servers close idle
                # ones after a few seconds) and the request never reached it: sent again once, at once. Counted
                # against the deployment (its breaker) only if that fails too.
                response = await _post(upstream, endpoint, data, stream)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _call_failure(exc, upstream.name) from None
        status = response.status
        if stream and status == 200:
            return UpstreamAnswer(pieces=_stream_pieces(response, upstream.name), close=response.close)
        try:
            body = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if not stream:
                raise _call_failure(exc, upstream.name) from None
            body = b""  # a stream refused with an unreadable body: its status says enough
        finally:
            response.release()
        if status != 200:
            raise UpstreamRefused(upstream.name, status, _error_message(body, upstream))
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamBrokeOff(f"The upstream {upstream.name!r} answered with invalid JSON.") from None
        return UpstreamAnswer(body=body, usage=parsed.get("usage") if isinstance(parsed, dict) else None)


def _post(upstream: UpstreamTarget, endpoint: str, data: bytes, stream: bool) -> Any:
    return upstream_session().post(
        upstream.urls[endpoint],
        data=data,
        headers=upstream.headers,
        # A JSON answer must come within timeout_s; a stream may last longer, with no gap above it.
        timeout=upstream.stream_timeout if stream else upstream.timeout,
        allow_redirects=False,
    )


def _call_failure(exc: BaseException, upstream: str) -> UpstreamError:
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(upstream)
    return UpstreamUnreachable(upstream, type(exc).__name__)


async def _stream_pieces(response: aiohttp.ClientResponse, upstream: str) -> AsyncIterator[bytes]:
    """Bytes from the upstream as they arrive; the connection is closed early if we stop early."""
    finished = False
    try:
        async for piece in response.content.iter_any():
            yield piece
        finished = True
    except TimeoutError:
        raise UpstreamTimeout(upstream) from None
    except aiohttp.ClientError:
        raise UpstreamBrokeOff(f"The upstream {upstream!r} broke off the stream.") from None
    finally:
        if finished:
            response.release()
        else:
            response.close()


def _error_message(body: bytes, upstream: UpstreamTarget) -> str:
    """The upstream's own error message, when it sent one, without our credentials for it."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return ""
    message: str = error["message"]
    # Some upstreams quote the credential they were sent ("Incorrect API key provided: ...").
    for name in _SECRET_HEADERS:
        value = upstream.headers.get(name)
        if value:
            message = secret_blank(message, value[7:] if value[:7].lower() == "bearer " else value)
    return message[:500]


class MockBackend:
    """The ``mock`` kind: deterministic answers made in-process (``proxy/mock_backend.py``)."""

    async def send(
        self, endpoint: str, payload: dict[str, Any], deployment: DeploymentTarget, stream: bool
    ) -> UpstreamAnswer:
        if stream:
            return UpstreamAnswer(pieces=mock_stream(endpoint, payload, deployment.upstream_model))
        answer = mock_answer(endpoint, payload, deployment.upstream_model)
        return UpstreamAnswer(body=orjson.dumps(answer), usage=answer.get("usage"))


BACKENDS: dict[str, Backend] = {"openai": OpenAIBackend(), "mock": MockBackend()}
