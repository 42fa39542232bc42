"""Domain errors of the route registry (``apiforge.errors.api_exception_handler`` answers them)."""

from __future__ import annotations

from rest_framework import status

from apiforge.errors import DomainError


class RouteKeyRefused(DomainError):
    """An API key may not make this write: the route is not named by its ``allowed_routes``, a target is outside
    ``ROUTE_TARGET_ALLOWLIST``, or registration by key is off (an empty allowlist)."""

    status_code = status.HTTP_403_FORBIDDEN
    default_code = "route_key_refused"
    default_detail = "This API key may not register or change this route."
