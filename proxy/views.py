"""The proxy as plain async Django views: a thin adapter over ``proxy.edge``, like the lean ASGI app.

Production traffic on ``/v1/`` and ``/gw/`` takes the lean ASGI path (``proxy/asgi.py``);
these views serve the same URLs when the dispatcher is off
(``PROXY_LEAN_ASGI=false``) and let Django's test client exercise the proxy.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from apiforge.client_ip import client_ip
from apiforge.request_id import request_id_from
from proxy.edge.exchange import ProxyRequest
from proxy.edge.ingress import answer_headers, ingress_refusal, request_headers
from proxy.edge.pipeline import proxy_handle


def _raw_headers(request: HttpRequest) -> Iterable[tuple[bytes, bytes]]:
    """The request's header pairs as the ASGI scope has them (rebuilt from META under WSGI)."""
    scope = getattr(request, "scope", None)
    if scope is not None:
        headers: Iterable[tuple[bytes, bytes]] = scope["headers"]
        return headers
    return [
        (name[5:].lower().replace("_", "-").encode("latin-1"), str(value).encode("latin-1"))
        for name, value in request.META.items()
        if name.startswith("HTTP_")
    ]


@csrf_exempt
async def openai_proxy(request: HttpRequest, path: str) -> HttpResponse | StreamingHttpResponse:
    """Any ``/v1/<path>`` or ``/gw/<path>`` request."""
    api_key, incoming_id, _length = request_headers(_raw_headers(request))
    request_id = getattr(request, "request_id", None) or request_id_from(incoming_id)
    limit = settings.PROXY_MAX_BODY_BYTES
    body = request.read(limit + 1)
    response = ingress_refusal(request.path_info, body if len(body) <= limit else None)
    if response is None:
        response = await proxy_handle(
            ProxyRequest(
                method=request.method or "GET",
                path=request.path_info,
                api_key=api_key,
                client_ip=client_ip(request),
                request_id=request_id,
                body=body,
            )
        )
    headers = answer_headers(response, request_id.encode())
    if response.stream is not None:
        streaming = StreamingHttpResponse(response.stream, status=response.status)
        _set_headers(streaming, headers)
        return streaming
    answer = HttpResponse(response.body, status=response.status)
    _set_headers(answer, headers)
    if answer.status_code >= 500:
        # proxy_handle has logged what deserves it (an unexpected error, once); keep django.request from adding
        # an ERROR line for every upstream failure or outage, so both paths log alike.
        answer._has_been_logged = True  # type: ignore[attr-defined]
    return answer


def _set_headers(answer: HttpResponseBase, headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        answer[name.decode("latin-1")] = value.decode("latin-1")
