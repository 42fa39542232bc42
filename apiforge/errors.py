"""One JSON error shape for the management API and Django's own error pages.

Every error answer is ``{"detail": <message>, "code": <code>}``, plus ``"fields"``
(field name -> list of messages) for validation errors. The proxy has its own,
OpenAI-shaped errors in ``proxy/errors.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

logger = logging.getLogger(__name__)


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {str(k): _flatten(v) for k, v in detail.items()}
    if isinstance(detail, list):
        return [_flatten(v) for v in detail]
    return str(detail)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF exception handler: the project's error shape for every API error."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        logger.exception("unhandled error in API view", exc_info=exc)
        return Response(
            {"detail": "Internal server error.", "code": "server_error"},
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail
        fields = _flatten(detail) if isinstance(detail, dict) else {"non_field_errors": _flatten(detail)}
        non_field = fields.get("non_field_errors")
        message = non_field[0] if isinstance(non_field, list) and non_field else "Invalid input."
        response.data = {"detail": message, "code": "invalid", "fields": fields}
    else:
        codes = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        response.data = {
            "detail": str(exc.detail) if not isinstance(exc.detail, (list, dict)) else _flatten(exc.detail),
            "code": codes if isinstance(codes, str) else "error",
        }
    return response


def _json_error(status_code: int, message: str, code: str) -> JsonResponse:
    return JsonResponse({"detail": message, "code": code}, status=status_code)


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(400, "Bad request.", "bad_request")


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(403, "You do not have permission to perform this action.", "permission_denied")


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(404, "Not found.", "not_found")


def handler500(request: HttpRequest) -> JsonResponse:
    return _json_error(500, "Internal server error.", "server_error")
