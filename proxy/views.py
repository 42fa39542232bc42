"""The proxy as plain async Django views: the same ``proxy_handle`` behind Django's request cycle.

Production traffic on ``/v1/`` takes the lean ASGI path (``proxy/asgi.py``);
these views serve the same URLs when the dispatcher is off
(``PROXY_LEAN_ASGI=false``) and let Django's test client exercise the proxy.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from apiforge.request_id import request_id_from
from proxy.core import ProxyRequest, proxy_handle
from proxy.errors import ProxyError


def _api_key(request: HttpRequest) -> str | None:
    authorization = request.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return request.headers.get("x-api-key") or request.headers.get("api-key") or None


@csrf_exempt
async def openai_proxy(request: HttpRequest, path: str) -> HttpResponse | StreamingHttpResponse:
    """Any ``/v1/<path>`` request."""
    request_id = getattr(request, "request_id", None) or request_id_from(request.headers.get("x-request-id"))
    limit = settings.PROXY_MAX_BODY_BYTES
    body = request.read(limit + 1)
    if len(body) > limit:
        error = ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        return HttpResponse(error.body(), status=413, content_type="application/json")
    response = await proxy_handle(
        ProxyRequest(
            method=request.method or "GET",
            path=f"/v1/{path}",
            api_key=_api_key(request),
            client_ip=request.META.get("REMOTE_ADDR"),
            request_id=request_id,
            body=body,
        )
    )
    if response.stream is not None:
        streaming = StreamingHttpResponse(
            response.stream, status=response.status, content_type=response.content_type.decode()
        )
        streaming["Cache-Control"] = "no-cache"
        streaming["X-Accel-Buffering"] = "no"
        return streaming
    answer = HttpResponse(response.body, status=response.status, content_type=response.content_type.decode())
    for name, value in response.headers:
        answer[name.decode("latin-1")] = value.decode("latin-1")
    if answer.status_code >= 500:
        # proxy_handle has logged what deserves it (an unexpected error, once); keep django.request from adding
        # an ERROR line for every upstream failure or outage, so both paths log alike.
        answer._has_been_logged = True  # type: ignore[attr-defined]
    return answer
