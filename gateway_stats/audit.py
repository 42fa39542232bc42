"""What an audit event needs from the request that caused it, and the JSON-safe form of audited values.

The HTTP layers (management API, admin) build one ``AuditContext`` per request
(``apiforge.audit.audit_context``) and hand its fields to the writing services,
which pass them on to ``audit_record``; commands and tasks pass none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, TypedDict

from django.contrib.auth.base_user import AbstractBaseUser


class AuditKwargs(TypedDict):
    """The audit keyword arguments every writing service takes."""

    actor: AbstractBaseUser | None
    ip_address: str | None


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Who made a write and from where: the user (``None`` when anonymous) and the client address."""

    actor: AbstractBaseUser | None
    ip_address: str | None

    def service_kwargs(self) -> AuditKwargs:
        """As the services' keyword arguments: ``key_revoke(key=key, **context.service_kwargs())``."""
        return {"actor": self.actor, "ip_address": self.ip_address}


def audit_value(value: Any) -> Any:
    """``value`` as JSON can hold it: datetimes in ISO 8601, decimals as strings, containers recursively."""
    if isinstance(value, dict):
        return {str(key): audit_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [audit_value(item) for item in value]
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value
