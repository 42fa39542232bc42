"""503 instead of 500 when a dependency is down: the database, its connection pool, or the shared cache.

A request that needs PostgreSQL while it is unreachable (or while every pooled
connection is taken, ``DB_POOL_TIMEOUT_S``), or a write whose cache invalidation
cannot be published (``CacheUnavailable``), is the client's to retry, not a bug:
it is answered ``503`` in the error shape with ``Retry-After``, logged once as a
warning (no traceback), and nothing half-done is committed. DRF views get this
from ``apiforge.errors.api_exception_handler``; everything else Django serves
(the admin, plain views) from ``ServiceUnavailableMiddleware``.
"""

from __future__ import annotations

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.deprecation import MiddlewareMixin
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apiforge.local_cache import CacheUnavailable

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5

# The database errors that mean "unreachable or saturated" (a psycopg pool timeout is an OperationalError);
# the proxy maps the same ones to its OpenAI-shaped 503.
DATABASE_ERRORS = (OperationalError, InterfaceError)
_CACHE_ERRORS = (ConnectionInterrupted, RedisConnectionError, RedisTimeoutError)


def unavailable_answer(exc: BaseException) -> tuple[str, str] | None:
    """``(message, code)`` when ``exc`` means a dependency is unavailable, else None."""
    if isinstance(exc, CacheUnavailable):
        return str(exc), "cache_unavailable"
    if isinstance(exc, DATABASE_ERRORS):
        return "The database is unavailable or busy; retry shortly.", "database_unavailable"
    if isinstance(exc, _CACHE_ERRORS):
        return "The shared cache is unavailable; retry shortly.", "cache_unavailable"
    return None


def unavailable_log(request_path: str, exc: BaseException, code: str) -> None:
    # One warning line, no traceback: the cause is outside this process and already named.
    first_line = next(iter(str(exc).splitlines()), "")
    logger.warning("503 %s on %s: %s: %s", code, request_path, type(exc).__name__, first_line)


def unavailable_response(request: HttpRequest, exc: BaseException) -> HttpResponse | None:
    """The 503 answer for ``exc``, or None when it is not an unavailable dependency."""
    answer = unavailable_answer(exc)
    if answer is None:
        return None
    message, code = answer
    unavailable_log(request.path, exc, code)
    response = JsonResponse({"detail": message, "code": code}, status=503)
    response["Retry-After"] = str(RETRY_AFTER_S)
    # Logged above as a warning: keep django.request from logging it again as an ERROR.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


class ServiceUnavailableMiddleware(MiddlewareMixin):
    """Turns an unavailable database or cache, raised by any non-DRF view, into a 503 in the error shape."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        return unavailable_response(request, exception)
