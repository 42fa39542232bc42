"""One JSON error shape for the management API and Django's own error pages.

Every error answer is ``{"detail": <message>, "code": <code>}``, plus ``"fields"``
for validation errors: a flat object, field path -> list of messages, where the
path of a nested value is dotted (``deployments.0.upstream``, ``metadata.note``).
The proxy has its own, OpenAI-shaped errors in ``proxy/errors.py``.

A body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` answers 413 ``request_too_large``;
Django's other ``SuspiciousOperation``s answer 400 ``bad_request``.

This is the one place where errors become HTTP answers for the management API:
DRF's exceptions, Django's ``Http404``/``PermissionDenied``/``ValidationError``
(raised by services), and the apps' domain errors (subclasses of ``DomainError``
in each app's ``exceptions.py``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler, set_rollback

from apiforge.unavailable import RETRY_AFTER_S, unavailable_answer, unavailable_log, unavailable_response

logger = logging.getLogger(__name__)

# The challenge sent with every 401 of the management API (RFC 9110 requires one).
WWW_AUTHENTICATE = 'Bearer realm="api"'


class DomainError(Exception):
    """Base of the apps' domain errors: an HTTP status, a stable code and a message.

    Apps subclass it in their ``exceptions.py``; ``api_exception_handler`` turns it
    into the JSON error shape. ``retry_after`` (seconds) becomes a ``Retry-After`` header.
    """

    status_code: int = status.HTTP_400_BAD_REQUEST
    default_code: str = "invalid"
    default_detail: str = "Invalid request."

    def __init__(self, detail: str | None = None, *, code: str | None = None, retry_after: int | None = None) -> None:
        self.detail = detail or self.default_detail
        self.code = code or self.default_code
        self.retry_after = retry_after
        super().__init__(self.detail)


class ErrorResponseSerializer(serializers.Serializer):
    """The error shape, for the OpenAPI document (never used to render)."""

    detail = serializers.CharField(help_text="What went wrong, for humans.")
    code = serializers.CharField(help_text="A stable, machine-readable error code.")

    def get_fields(self) -> dict[str, serializers.Field]:
        # Added here because a class attribute named "fields" would shadow Serializer.fields.
        fields = super().get_fields()
        fields["fields"] = serializers.DictField(
            child=serializers.ListField(child=serializers.CharField()),
            required=False,
            help_text="Validation errors only: field path -> messages. Nested values have dotted paths "
            "(`deployments.0.upstream`); errors about the whole body are under `non_field_errors`.",
        )
        return fields


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "request_too_large"


def _flatten(detail: Any) -> dict[str, list[str]]:
    """DRF's nested error detail as ``{dotted path: [messages]}`` (iteratively: detail mirrors the input's depth).

    A nested serializer's own ``non_field_errors`` are reported on its path.
    """
    fields: dict[str, list[str]] = {}
    stack: list[tuple[Any, tuple[str, ...]]] = [(detail, ())]
    while stack:
        value, parts = stack.pop()
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                name = str(key)
                nested = (*parts, name) if not (parts and name == api_settings.NON_FIELD_ERRORS_KEY) else parts
                stack.append((item, nested))
        elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
            # A list of nested errors (many=True, ListField of objects): one entry per item, valid ones empty.
            stack.extend((item, (*parts, str(index))) for index, item in reversed(list(enumerate(value))))
        else:
            messages = value if isinstance(value, list) else [value]
            path = ".".join(parts) or api_settings.NON_FIELD_ERRORS_KEY
            fields.setdefault(path, []).extend(str(message) for message in messages)
    return fields


def _django_validation_fields(exc: DjangoValidationError) -> dict[str, list[str]]:
    if hasattr(exc, "error_dict"):
        fields = {
            (api_settings.NON_FIELD_ERRORS_KEY if name == NON_FIELD_ERRORS else name): messages
            for name, messages in exc.message_dict.items()
        }
        return fields
    return {api_settings.NON_FIELD_ERRORS_KEY: list(exc.messages)}


def _as_api_exception(exc: Exception) -> Exception:
    """Translate Django and domain exceptions into DRF ones; anything else is returned unchanged."""
    if isinstance(exc, Http404):
        return exceptions.NotFound()
    if isinstance(exc, PermissionDenied):
        return exceptions.PermissionDenied()
    if isinstance(exc, DjangoValidationError):
        return exceptions.ValidationError(detail=_django_validation_fields(exc))
    if isinstance(exc, RequestDataTooBig):
        return RequestTooLarge()
    if isinstance(exc, SuspiciousOperation):
        logger.warning("suspicious request refused: %s", exc)
        return exceptions.ParseError(detail="Bad request.", code="bad_request")
    if isinstance(exc, DomainError):
        api_exc = exceptions.APIException(detail=exc.detail, code=exc.code)
        api_exc.status_code = exc.status_code
        if exc.retry_after is not None:
            api_exc.wait = exc.retry_after  # type: ignore[attr-defined]  # read by DRF: Retry-After
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            api_exc.auth_header = WWW_AUTHENTICATE  # type: ignore[attr-defined]  # read by DRF
        return api_exc
    return exc


def _message_and_code(exc: exceptions.APIException) -> tuple[str, str]:
    detail = exc.detail
    if isinstance(detail, dict):
        # simplejwt's authentication errors carry {"detail", "code", "messages"}.
        message = detail.get("detail", "")
        code = detail.get("code", "")
        return str(message) or "Request failed.", str(code) or exc.default_code
    if isinstance(detail, list):
        return " ".join(str(item) for item in detail), exc.default_code
    return str(detail), str(getattr(detail, "code", None) or exc.default_code)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF exception handler: the project's error shape for every API error."""
    unavailable = unavailable_answer(exc)
    if unavailable is not None:
        # The database or the shared cache is down or saturated: the client's to retry, not a bug.
        request = context.get("request")
        unavailable_log(getattr(request, "path", "?"), exc, unavailable[1])
        set_rollback()
        busy = Response(
            {"detail": unavailable[0], "code": unavailable[1]},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
        busy._has_been_logged = True  # type: ignore[attr-defined]  # logged above, as a warning
        return busy
    exc = _as_api_exception(exc)
    response = exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        logger.exception("unhandled error in API view", exc_info=exc)
        set_rollback()
        return Response(
            {"detail": "Internal server error.", "code": "server_error"},
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    if isinstance(exc, exceptions.ValidationError):
        fields = _flatten(exc.detail)
        non_field = fields.get(api_settings.NON_FIELD_ERRORS_KEY)
        message = non_field[0] if isinstance(non_field, list) and non_field else "Invalid input."
        response.data = {"detail": message, "code": "invalid", "fields": fields}
    else:
        message, code = _message_and_code(exc)
        response.data = {"detail": message, "code": code}
    return response


def json_error(status_code: int, message: str, code: str) -> JsonResponse:
    """The error shape outside DRF (plain Django views, error handlers)."""
    return JsonResponse({"detail": message, "code": code}, status=status_code)


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    # Django answers its SuspiciousOperations (RequestDataTooBig among them) through this handler.
    if isinstance(exception, RequestDataTooBig):
        return json_error(413, RequestTooLarge.default_detail, RequestTooLarge.default_code)
    return json_error(400, "Bad request.", "bad_request")


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error(403, "You do not have permission to perform this action.", "permission_denied")


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error(404, "Not found.", "not_found")


def handler500(request: HttpRequest) -> HttpResponse:
    # Reached for errors outside any view (e.g. a middleware saving the session while the database is down).
    exc = sys.exception()
    if exc is not None and (response := unavailable_response(request, exc)) is not None:
        return response
    return json_error(500, "Internal server error.", "server_error")


def csrf_failure(request: HttpRequest, reason: str = "") -> JsonResponse:
    """``CSRF_FAILURE_VIEW``: a session-authenticated unsafe request without a valid CSRF token."""
    return json_error(
        403, f"CSRF verification failed: {reason}" if reason else "CSRF verification failed.", "csrf_failed"
    )
