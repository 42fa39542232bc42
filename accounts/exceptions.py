"""Domain errors of the accounts app (mapped to HTTP answers by ``apiforge.errors``)."""

from __future__ import annotations

from rest_framework import status

from apiforge.errors import DomainError


class InvalidCredentials(DomainError):
    """Unknown username, wrong password or inactive account: one answer for all three."""

    status_code = status.HTTP_401_UNAUTHORIZED
    default_code = "invalid_credentials"
    default_detail = "Invalid username or password."


class LoginThrottled(DomainError):
    """Too many login attempts for this username or from this address; ``retry_after`` says for how long.

    Raised by ``django.contrib.auth.authenticate()`` itself (``accounts.backends``), so every login path sees it.
    """

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "throttled"
    default_detail = "Too many failed login attempts."


class RegistrationThrottled(DomainError):
    """Too many registrations from this address; ``retry_after`` says for how long."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "throttled"
    default_detail = "Too many registrations from this address."
