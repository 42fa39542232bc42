"""``proxy_handle``: one proxy request through the stages, from the front door's ``ProxyRequest`` to its answer.

Never raises: a refusal is its OpenAI-shaped error, an unexpected failure a logged 500 (or a 503 when the
database is down), and every request ends with one usage event (``account``).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from apiforge.unavailable import DATABASE_ERRORS
from gateway_stats.usage import UsageEvent
from proxy.catalog import Catalog, DeploymentTarget, ModelTarget, catalog_get_async
from proxy.edge.account import account
from proxy.edge.admit import Admission, admit_call, admit_listing
from proxy.edge.authenticate import authenticate, model_target
from proxy.edge.endpoints import Endpoint, endpoint_for
from proxy.edge.exchange import ProxyRequest, ProxyResponse
from proxy.edge.listing import models_answer
from proxy.edge.payload import payload_parse, stream_usage_request
from proxy.edge.pick import (
    breaker_failed,
    candidates,
    deployment_finished,
    deployment_note,
    deployment_pick,
    retry_after_s,
)
from proxy.edge.relay import relay
from proxy.edge.send import upstream_send
from proxy.errors import ProxyError, UpstreamError, internal_error, secret_blank, service_unavailable

logger = logging.getLogger(__name__)


async def proxy_handle(request: ProxyRequest) -> ProxyResponse:
    """Answer one proxy request: route, authenticate, validate, admit (the limits: ``proxy.edge.admit``), then
    forward (or list models); settle the limits and account."""
    event = UsageEvent(
        request_id=request.request_id,
        endpoint=request.path,
        status=0,
        method=request.method,
        client_ip=request.client_ip or "",
        request_bytes=len(request.body),
    )
    started = time.perf_counter()
    admission: Admission | None = None
    try:
        endpoint = endpoint_for(request.method, request.path)
        policy = await authenticate(request, event)
        if endpoint.required:
            payload = payload_parse(request.body, endpoint.required)
            catalog = await catalog_get_async()
            target = model_target(catalog, policy, payload["model"])
            event.model = target.name
            admission = await admit_call(policy, target, payload, len(request.body), endpoint.name)
            response = await _forward(endpoint, payload, catalog, target, event, started, admission)
        else:
            admission = await admit_listing(policy)
            response = await models_answer(request.path, policy)
    except ProxyError as error:
        response = _error_response(error, request.api_key)
        event.error_code = error.code
    except Exception as exc:
        failure = _unexpected_error(exc)
        response = _error_response(failure)
        event.error_code = failure.code
    if admission is not None:
        response.headers.extend(admission.headers)
    if response.stream is None:  # a stream accounts for itself when it ends (relay)
        event.status = response.status
        event.response_bytes = len(response.body)
        if admission is not None:
            admission.finish(event)
        account(event, started)
    elif admission is not None:  # the relay settles at the stream's end; this catches a stream never started
        response.closed = partial(admission.finish, event)
    return response


async def _forward(
    endpoint: Endpoint,
    payload: dict[str, Any],
    catalog: Catalog,
    target: ModelTarget,
    event: UsageEvent,
    started: float,
    admission: Admission | None,
) -> ProxyResponse:
    """Pick a deployment, send; on a retryable failure the next deployment, then the fallbacks.

    Every attempt's end goes to the balancer (a stream's when it ends: ``relay``), so a failing deployment's
    breaker opens and later picks pass it by; when every deployment of the model and its fallbacks is refused
    by its breaker, the answer is 503 ``no_healthy_upstream`` with ``Retry-After`` (the soonest half-open).
    """
    stream = endpoint.streamable and bool(payload.get("stream"))
    keep_usage_chunk = stream and stream_usage_request(payload)
    event.stream = stream
    last_failure: UpstreamError | None = None
    tried_models = candidates(catalog, target)
    for candidate in tried_models:
        deployment = deployment_pick(candidate)
        if deployment is None:
            continue
        tried: set[str] = set()
        for attempt in range(1 + deployment.upstream.max_retries):
            if attempt:
                deployment = deployment_pick(candidate, tried)
                if deployment is None:
                    break  # the others' (and this one's) breakers refuse: the next model
            tried.add(deployment.key)
            deployment_note(event, candidate, deployment)
            call_started = time.perf_counter()
            try:
                answer = await upstream_send(endpoint.name, payload, deployment, stream)
            except UpstreamError as failure:
                # The one place every failed upstream call passes: retries decide here (never after a
                # stream's first byte: those failures end the relay instead), and the breaker learns of it.
                deployment_finished(
                    candidate, deployment, not breaker_failed(failure), time.perf_counter() - call_started
                )
                if not failure.retryable:
                    raise
                last_failure = failure
                continue
            except BaseException:
                deployment_finished(candidate, deployment, None, time.perf_counter() - call_started)
                raise
            if answer.pieces is None:
                deployment_finished(candidate, deployment, True, time.perf_counter() - call_started)
                return relay(answer, event, started, keep_usage_chunk)
            ended = partial(_stream_ended, candidate, deployment, call_started, admission, event)
            return relay(answer, event, started, keep_usage_chunk, ended)
    if last_failure is not None:
        raise last_failure
    wait = retry_after_s(tried_models)
    raise ProxyError(
        503,
        f"No healthy upstream for the model {target.name!r}.",
        code="no_healthy_upstream",
        headers=() if wait is None else ((b"retry-after", str(wait).encode()),),
    )


def _stream_ended(
    target: ModelTarget,
    deployment: DeploymentTarget,
    call_started: float,
    admission: Admission | None,
    event: UsageEvent,
    ok: bool | None,
    first_byte_at: float,
) -> None:
    # A stream's latency, for the balancer, is its time to first byte (its length is the client's choice).
    deployment_finished(target, deployment, ok, first_byte_at - call_started)
    if admission is not None:  # its usage is known now: settle, and free its concurrency slot
        admission.finish(event)


def _error_response(error: ProxyError, api_key: str | None = None) -> ProxyResponse:
    # A client-supplied value echoed in a message (a model name, a path) may carry the key itself.
    error.message = secret_blank(error.message, api_key)
    return ProxyResponse(status=error.status, body=error.body(), headers=list(error.headers))


def _unexpected_error(exc: Exception) -> ProxyError:
    """The answer for an exception no refusal accounts for: 503 for a dependency outage, else a logged 500."""
    if isinstance(exc, DATABASE_ERRORS):
        # The database is unreachable (or its pool exhausted: psycopg_pool's PoolTimeout reaches us as an
        # OperationalError) and this answer needs it: a key or the catalog not in memory or the shared
        # cache. Not logged per request: the health check and the usage events' error_code show it.
        return service_unavailable()
    logger.exception("unexpected error on the proxy path")
    return internal_error()
