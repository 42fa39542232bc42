"""Writes of the statistics app: the audit trail (each event also published on the event bus, topic ``audit``)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from gateway_stats.audit import audit_value
from gateway_stats.models import AuditEvent

AUDIT_TOPIC = "audit"


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
    """Append one audit event. ``changes`` must never hold secrets; datetimes and decimals are stored as strings.

    Once the surrounding transaction commits (at once outside one), the event is published on the event bus;
    a rolled-back write publishes nothing.
    """
    event = AuditEvent.objects.create(
        actor=actor if actor is not None and getattr(actor, "pk", None) else None,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        object_repr=object_repr[:200],
        changes=audit_value(changes or {}),
        ip_address=ip_address,
    )
    payload = audit_event_payload(event)
    # robust: a failing publisher is logged, never turns a committed write into an error answer.
    transaction.on_commit(lambda: _audit_publish(payload), robust=True)
    return event


def audit_event_payload(event: AuditEvent) -> dict[str, Any]:
    """An audit event as JSON-safe data: the fields ``/api/audit/`` answers."""
    actor = event.actor
    return {
        "id": event.pk,
        "created_at": event.created_at.isoformat(),
        "actor": event.actor_id,
        "actor_username": actor.get_username() if actor is not None else None,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "object_repr": event.object_repr,
        "changes": event.changes,
        "ip_address": event.ip_address,
    }


def _audit_publish(payload: dict[str, Any]) -> None:
    # Imported when first used: the writing apps import this module, the bus need not load with them.
    from gateway_stats.events import event_publish

    event_publish(AUDIT_TOPIC, payload)  # fire and forget: queues and returns, never raises
