"""Reads of the request log (ledger rows) and of the audit trail, as the API and the admin show them.

Who sees which ledger rows: staff holding ``gateway_stats.view_usagerecord`` (superusers hold it) see every
row; everyone else sees the rows of their own calls, that is the rows whose ``user`` is them or whose key they
own (the ledger keeps no database constraint to keys, so the key's owner is read through a subquery). A row
they may not see is not found, exactly like a row that does not exist.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model, Q, QuerySet

from apiforge.permissions import staff_has_model_perm
from gateway_stats.models import AuditEvent, UsageRecord


def usage_record_sees_all(*, actor: Any) -> bool:
    """Whether ``actor`` may read every user's ledger rows (and filter them by user and route)."""
    return staff_has_model_perm(actor, "view", UsageRecord)


def _key_model() -> type[Model]:
    # The ledger's key reference names keys.ApiKey by string: gateway_stats does not import the keys app.
    model: type[Model] = UsageRecord._meta.get_field("key").related_model  # type: ignore[assignment]
    return model


def usage_record_list(*, actor: Any) -> QuerySet[UsageRecord]:
    """The ledger rows ``actor`` may see, newest first (by ``started_at``, then insertion order)."""
    records = UsageRecord.objects.all()
    if not usage_record_sees_all(actor=actor):
        owned_keys = _key_model()._default_manager.filter(owner_id=actor.pk).values("pk")
        records = records.filter(Q(user_id=actor.pk) | Q(key_id__in=owned_keys))
    return records.order_by("-started_at", "-id")


def usage_record_get(*, actor: Any, lookup: str) -> UsageRecord | None:
    """The row ``lookup`` names among those ``actor`` may see, or ``None``.

    ``lookup`` is a row's ``event_id`` (unique) or an ``x-request-id``. A client may send the same request id
    with several calls, so a request id names the most recent of its rows; its ``event_id`` names each one.
    """
    visible = usage_record_list(actor=actor)
    return visible.filter(event_id=lookup).first() or visible.filter(request_id=lookup).first()


def audit_event_list() -> QuerySet[AuditEvent]:
    """The audit trail, newest first, with each event's actor (for their username)."""
    return AuditEvent.objects.select_related("actor").order_by("-created_at", "-id")
