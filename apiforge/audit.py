"""The audit context of a management request (API or admin), built once and handed to the services."""

from __future__ import annotations

from django.contrib.auth.base_user import AbstractBaseUser
from django.http import HttpRequest
from rest_framework.request import Request

from apiforge.client_ip import client_ip
from gateway_stats.audit import AuditContext


def audit_context(request: HttpRequest | Request) -> AuditContext:
    """The user (``None`` unless authenticated) and the client address (``apiforge.client_ip``) of ``request``."""
    user = request.user
    actor = user if isinstance(user, AbstractBaseUser) else None
    return AuditContext(actor=actor, ip_address=client_ip(request))
