"""The authentication backend: Django's ``ModelBackend`` behind the login throttle.

Installed as the only entry of ``AUTHENTICATION_BACKENDS``, so every caller of
``django.contrib.auth.authenticate()`` (``/auth/login``, the admin's login form, and
anything added later) shares one lockout. The attempt is counted before the password
is checked (``accounts.throttling``); while the username or the address is locked out,
``LoginThrottled`` is raised and no password is hashed. Callers turn that error into
their own answer: a 429 for the API, a form error in the admin.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.http import HttpRequest

from accounts.exceptions import LoginThrottled
from accounts.models import User
from accounts.throttling import login_attempt_abandoned, login_attempt_reserve, login_attempt_succeeded
from apiforge.client_ip import client_ip

logger = logging.getLogger("accounts")


def login_client_ip(request: HttpRequest | None) -> str | None:
    """The address a login attempt comes from (``apiforge.client_ip``), or ``None`` without a request."""
    return None if request is None else client_ip(request)


class ThrottledModelBackend(ModelBackend):
    """``ModelBackend`` whose ``authenticate()`` refuses, without checking the password, while locked out."""

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> User | None:
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        if username is None or password is None:
            return None
        ip = login_client_ip(request)
        try:
            attempt = login_attempt_reserve(username=username, ip=ip)
        except LoginThrottled:
            logger.warning("login throttled: username=%s ip=%s", username, ip)
            raise
        try:
            user = super().authenticate(request, username=username, password=password, **kwargs)
        except BaseException:
            login_attempt_abandoned(attempt)
            raise
        if user is None:
            logger.warning("login failed: username=%s ip=%s", username, ip)
            return None
        login_attempt_succeeded(attempt)
        return user

    async def aauthenticate(
        self, request: HttpRequest | None, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> User | None:
        # ModelBackend's own async version would skip the throttle; the cache calls are sync anyway.
        return await sync_to_async(self.authenticate)(request, username=username, password=password, **kwargs)
