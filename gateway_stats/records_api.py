"""The request log (``/api/usage/``, ``/api/usage/{request_id}/``) and the audit trail (``/api/audit/``,
``/api/audit/{id}/``): read-only, paginated, newest first. Serializers render, filtersets parse the query
(a bad value is a 400 naming the parameter), the views call one selector of ``gateway_stats.records``.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, extend_schema_view
from rest_framework import mixins, serializers, viewsets
from rest_framework.exceptions import NotFound

from apiforge.filters import IdFilter, StrictDjangoFilterBackend
from apiforge.permissions import StaffModelPermissions
from gateway_stats.models import AuditEvent, UsageRecord
from gateway_stats.records import audit_event_list, usage_record_get, usage_record_list

_READ_ONLY = ["get", "head", "options"]
_TIME_HELP = "ISO 8601, e.g. 2025-01-31T12:00:00Z (without an offset: UTC)"


class _TimeRangeForm(forms.Form):
    """``start`` and ``end`` as a half-open range: ``end`` must come after ``start``."""

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        for name in ("start", "end"):
            value = cleaned.get(name)
            # Checked on the year, not by comparing instants: year 9999 at -13:00 overflows once made UTC.
            if value is not None and not 1970 <= value.year < 3000:
                self.add_error(name, "Must be between 1970-01-01 and 3000-01-01.")
                cleaned.pop(name, None)
        start, end = cleaned.get("start"), cleaned.get("end")
        if start is not None and end is not None and end <= start:
            self.add_error("end", "Must be after start.")
        return cleaned


def _time_filters(field_name: str) -> tuple[django_filters.IsoDateTimeFilter, django_filters.IsoDateTimeFilter]:
    return (
        django_filters.IsoDateTimeFilter(
            field_name=field_name, lookup_expr="gte", label=f"From this instant, included ({_TIME_HELP})"
        ),
        django_filters.IsoDateTimeFilter(
            field_name=field_name, lookup_expr="lt", label=f"Until this instant, excluded ({_TIME_HELP})"
        ),
    )


# --- the request log --------------------------------------------------------------------------------


class UsageRecordSerializer(serializers.ModelSerializer[UsageRecord]):
    """One proxied call as the ledger holds it. ``cost`` and the prices are decimal strings."""

    key = serializers.IntegerField(
        source="key_id", read_only=True, allow_null=True, help_text="Id of the API key used (it may be deleted since)."
    )
    user = serializers.IntegerField(
        source="user_id", read_only=True, allow_null=True, help_text="Id of the key's owner at call time."
    )

    class Meta:
        model = UsageRecord
        fields = [
            "request_id",
            "event_id",
            "started_at",
            "ingested_at",
            "key",
            "key_prefix",
            "user",
            "model",
            "upstream",
            "upstream_model",
            "route",
            "endpoint",
            "method",
            "status",
            "error_code",
            "stream",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "input_price_per_1k",
            "output_price_per_1k",
            "cost",
            "latency_ms",
            "ttfb_ms",
            "request_bytes",
            "response_bytes",
            "client_ip",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "request_id": {"help_text": "The answer's x-request-id (the client's own when it sent a sane one)."},
            "event_id": {"help_text": "The call's unique id in the ledger."},
            "model": {"help_text": "The public model name asked for."},
            "upstream": {"help_text": "The upstream that served the call (empty when none was reached)."},
            "upstream_model": {"help_text": "The model name sent to the upstream."},
            "status": {"help_text": "The HTTP status answered to the client."},
            "error_code": {"help_text": "The error's code (e.g. rate_limited, upstream_timeout); empty on success."},
            "cost": {"help_text": "prompt_tokens × input price + completion_tokens × output price, per 1,000."},
            "latency_ms": {"help_text": "From the request's arrival to the answer's last byte."},
            "ttfb_ms": {"help_text": "To the first byte of a stream; null when not streamed."},
        }


@extend_schema_field({"type": "integer", "minimum": 100, "maximum": 599})
class StatusFilter(IdFilter):
    """An HTTP status code, 100 to 599."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(min_value=100, max_value=599, **kwargs)


class UsageRecordFilter(django_filters.FilterSet):
    # Every filter narrows the rows the caller may see: someone else's key or user id gives an empty list.
    key = IdFilter(field_name="key_id", label="API key id")
    user = IdFilter(field_name="user_id", label="User id (staff: anyone's)")
    model = django_filters.CharFilter(label="Public model name")
    route = django_filters.CharFilter(label="Gateway route name")
    status = StatusFilter(field_name="status", label="HTTP status answered (100-599)")
    error_code = django_filters.CharFilter(label="Error code; empty value: no filter")
    stream = django_filters.BooleanFilter(label="Streamed calls only (true) or none (false)")
    start, end = _time_filters("started_at")

    class Meta:
        model = UsageRecord
        fields = ["key", "user", "model", "route", "status", "error_code", "stream", "start", "end"]
        form = _TimeRangeForm


@extend_schema(tags=["usage"])
@extend_schema_view(
    list=extend_schema(
        summary="The request log",
        description="One row per proxied call, newest first. You see the calls made with your keys; staff "
        "holding `gateway_stats.view_usagerecord` see every call (and filter them by `user`, for instance). "
        "Filters narrow what you may see: another user's key or user id gives an empty list. `start` is "
        "included, `end` excluded; `end` must come after `start` (else 400).",
    ),
    retrieve=extend_schema(
        summary="One call of the request log",
        description="By the call's `event_id`, or by its `x-request-id`. A client may send the same request id "
        "with several calls: a request id names the most recent of them (each one's `event_id` names it alone). "
        "A call you may not see answers 404, like one that does not exist.",
        parameters=[
            OpenApiParameter(
                "request_id",
                OpenApiTypes.STR,
                OpenApiParameter.PATH,
                description="The call's x-request-id or event_id.",
            )
        ],
    ),
)
class UsageRecordViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[UsageRecord]):
    serializer_class = UsageRecordSerializer
    filterset_class = UsageRecordFilter
    filter_backends = [StrictDjangoFilterBackend]  # always newest first: no ordering or search parameters
    http_method_names = _READ_ONLY
    lookup_field = "request_id"
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> QuerySet[UsageRecord]:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return UsageRecord.objects.none()
        return usage_record_list(actor=self.request.user)

    def get_object(self) -> UsageRecord:
        record = usage_record_get(actor=self.request.user, lookup=self.kwargs[self.lookup_field])
        if record is None:
            raise NotFound()
        return record


# --- the audit trail --------------------------------------------------------------------------------


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    actor = serializers.IntegerField(
        source="actor_id", read_only=True, allow_null=True, help_text="Id of the user who acted (null: none)."
    )
    actor_username = serializers.CharField(
        source="actor.username", read_only=True, allow_null=True, help_text="Their username (null: none)."
    )
    changes = serializers.JSONField(read_only=True, help_text="What changed (never secrets), or details.")

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "actor",
            "actor_username",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "changes",
            "ip_address",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "action": {"help_text": "What was done, e.g. key.create, upstream.update, user.login_failed."},
            "object_type": {"help_text": "app_label.model of the object, e.g. keys.apikey, accounts.user."},
            "ip_address": {"help_text": "The client address of the request that did it (null: not a request)."},
        }


class AuditEventFilter(django_filters.FilterSet):
    actor = IdFilter(field_name="actor_id", label="Id of the user who acted")
    action = django_filters.CharFilter(label="Action, e.g. key.create")
    object_type = django_filters.CharFilter(label="Object type, e.g. keys.apikey")
    object_id = django_filters.CharFilter(label="Object id (with object_type)")
    start, end = _time_filters("created_at")

    class Meta:
        model = AuditEvent
        fields = ["actor", "action", "object_type", "object_id", "start", "end"]
        form = _TimeRangeForm


@extend_schema(tags=["audit"])
@extend_schema_view(
    list=extend_schema(
        summary="The audit trail (staff)",
        description="Who did what to which object, when, from where: every management write (API and admin), "
        "logins, failed logins and logouts; newest first. Staff holding `gateway_stats.view_auditevent`. "
        "`start` is included, `end` excluded; `end` must come after `start` (else 400).",
    ),
    retrieve=extend_schema(summary="One audit event (staff)"),
)
class AuditEventViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[AuditEvent]):
    serializer_class = AuditEventSerializer
    permission_classes = [StaffModelPermissions]
    filterset_class = AuditEventFilter
    filter_backends = [StrictDjangoFilterBackend]
    http_method_names = _READ_ONLY

    def get_queryset(self) -> QuerySet[AuditEvent]:
        return audit_event_list()
