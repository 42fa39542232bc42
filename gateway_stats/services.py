"""Writes of the statistics app: the audit trail."""

from __future__ import annotations

from typing import Any

from gateway_stats.audit import audit_value
from gateway_stats.models import AuditEvent


def audit_record(
    *,
    actor: Any | None,
    action: str,
    object_type: str,
    object_id: str | int,
    object_repr: str = "",
    changes: dict[str, Any] | None = None,
    ip_address: str | None = None,
) -> AuditEvent:
    """Append one audit event. ``changes`` must never hold secrets; datetimes and decimals are stored as strings."""
    return AuditEvent.objects.create(
        actor=actor if actor is not None and getattr(actor, "pk", None) else None,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        object_repr=object_repr[:200],
        changes=audit_value(changes or {}),
        ip_address=ip_address,
    )
