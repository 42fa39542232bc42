"""Read-only admin pages: the request log (ledger rows) and the audit trail.

Nobody adds, changes or deletes these rows by hand (not even superusers): the ledger is written by the usage
consumer and trimmed by retention, the trail only grows. Staff with the view permission see the lists and each
row's page. The pages link to the key, user and audited object where the admin has a page for it; ledger rows
may name keys and users deleted since (no database constraint), so the links use the ids, never the objects.
The request log filters by status class (2xx / 4xx / 5xx) and by a typed key prefix or user, never by a list of
every key or user, and shows each status as a coloured badge.
"""

from __future__ import annotations

import json
from typing import Any

from django.apps import apps
from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html
from unfold.admin import ModelAdmin
from unfold.contrib.filters.admin import TextFilter
from unfold.decorators import display

from gateway_stats.dashboard import money_text
from gateway_stats.models import AuditEvent, UsageRecord


def _change_link(app_label: str, model_name: str, object_id: Any, text: Any) -> str:
    """A link to the object's admin change page, or just ``text`` when the admin has no such page."""
    if object_id in (None, ""):
        return str(text) if text not in (None, "") else "-"
    try:
        url = reverse(f"admin:{app_label}_{model_name}_change", args=[object_id])
    except NoReverseMatch:
        return str(text)
    return format_html('<a href="{}">{}</a>', url, text)


_BIGINT_MAX = 2**63 - 1
_STATUS_LABELS = {"2xx": "success", "3xx": "info", "4xx": "warning", "5xx": "danger"}


class StatusClassFilter(admin.SimpleListFilter):
    """Successes, client errors or upstream/gateway errors: the status range, on the (started_at-led) table."""

    title = "status class"
    parameter_name = "status_class"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("2xx", "2xx success"), ("4xx", "4xx client error"), ("5xx", "5xx server error")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
        value = self.value()
        if value not in {"2xx", "4xx", "5xx"}:
            return queryset
        low = int(value[0]) * 100
        return queryset.filter(status__gte=low, status__lt=low + 100)


class KeyPrefixFilter(TextFilter):
    """Calls made with keys whose prefix starts with the typed text (the prefix is kept on the row itself)."""

    title = "key prefix"
    parameter_name = "key_prefix"

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
        value = (self.value() or "").strip()
        return queryset.filter(key_prefix__startswith=value) if value else queryset


class UserFilter(TextFilter):
    """Calls by one user, typed as an id or an exact username."""

    title = "user (id or username)"
    parameter_name = "user"

    def queryset(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        if value.isdecimal():
            user_id = int(value)
            return queryset.filter(user_id=user_id) if user_id <= _BIGINT_MAX else queryset.none()
        return queryset.filter(user__username=value)


class _ReadOnlyAdmin(ModelAdmin):
    actions = None
    show_full_result_count = False  # one COUNT(*) per page is enough on a large table

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(_ReadOnlyAdmin):
    """The request log: one row per proxied call, newest first."""

    # The upstream and stream are filters and on each call's page: the list keeps to what fits 1400 px.
    list_display = [
        "started",
        "request_id",
        "key_link",
        "user_link",
        "target",
        "status_badge",
        "error",
        "tokens",
        "cost_text",
        "latency",
    ]
    list_display_links = ["started", "request_id"]
    list_filter = [
        StatusClassFilter,
        "status",
        "stream",
        "model",
        "route",
        "error_code",
        "upstream",
        KeyPrefixFilter,
        UserFilter,
    ]
    list_filter_submit = True  # the text filters apply on submit
    # Exact ids (indexed), and the start of a key prefix: what someone holding a request id or a key has.
    search_fields = ["=request_id", "=event_id", "^key_prefix"]
    search_help_text = "An exact request id or event id, or the beginning of a key prefix."
    date_hierarchy = "started_at"
    fieldsets = [
        (None, {"fields": ["request_id", "event_id", "started_at", "ingested_at"]}),
        ("Caller", {"fields": ["key_link", "key_prefix", "user_link", "client_ip"]}),
        (
            "Call",
            {"fields": ["method", "endpoint", "route", "model", "upstream", "upstream_model", "stream_text"]},
        ),
        ("Answer", {"fields": ["status", "error_code", "latency_ms", "ttfb_ms", "request_bytes", "response_bytes"]}),
        (
            "Tokens and cost",
            {
                "fields": [
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "input_price_per_1k",
                    "output_price_per_1k",
                    "cost_text",
                ]
            },
        ),
    ]

    @display(description="status", ordering="status", label=_STATUS_LABELS)
    def status_badge(self, obj: UsageRecord) -> tuple[str, int]:
        return f"{obj.status // 100}xx", obj.status

    # A streamed call is not a failure: a word, not Django's red cross for False, and the cost as the dashboard
    # writes it (0.000008, not the column's 0.0000080000).
    @admin.display(description="stream", ordering="stream")
    def stream_text(self, obj: UsageRecord) -> str:
        return "stream" if obj.stream else "–"

    @admin.display(description="error", ordering="error_code")
    def error(self, obj: UsageRecord) -> str:
        return obj.error_code or "-"

    @admin.display(description="tokens", ordering="total_tokens")
    def tokens(self, obj: UsageRecord) -> str:
        return f"{obj.total_tokens:,}"

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, obj: UsageRecord) -> str:
        return f"{obj.latency_ms:,.1f} ms"

    @admin.display(description="cost", ordering="cost")
    def cost_text(self, obj: UsageRecord) -> str:
        return money_text(obj.cost)

    @admin.display(description="started at", ordering="started_at")
    def started(self, obj: UsageRecord) -> str:
        """Month, day and time to the second, on one line (the date hierarchy above says the year)."""
        return format_html(
            '<span class="whitespace-nowrap">{}</span>', timezone.localtime(obj.started_at).strftime("%m-%d %H:%M:%S")
        )

    @admin.display(description="target", ordering="model")
    def target(self, obj: UsageRecord) -> str:
        """What was called: the model, the route, both (a route's call that names a model), or "-"."""
        if obj.model and obj.route:
            return f"{obj.model} ({obj.route})"
        return obj.model or obj.route or "-"

    @admin.display(description="key", ordering="key_id")
    def key_link(self, obj: UsageRecord) -> str:
        label = obj.key_prefix or obj.key_id
        if label in (None, ""):
            return "-"
        # A prefix never wraps at its dash: it is what staff copy and search by.
        return _change_link(
            "keys", "apikey", obj.key_id, format_html('<span class="whitespace-nowrap">{}</span>', label)
        )

    @admin.display(description="user", ordering="user_id")
    def user_link(self, obj: UsageRecord) -> str:
        user = obj.user  # joined (get_queryset); None when deleted since
        return _change_link("accounts", "user", obj.user_id, user.get_username() if user else obj.user_id)

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        return super().get_queryset(request).select_related("user")


@admin.register(AuditEvent)
class AuditEventAdmin(_ReadOnlyAdmin):
    """The audit trail: who did what to which object, when, from where."""

    list_display = ["created_at", "actor", "action", "object_type", "object_link", "ip_address"]
    list_display_links = ["created_at", "action"]
    list_filter = [
        "action",
        "object_type",
        ("actor", admin.RelatedOnlyFieldListFilter),
        ("created_at", admin.DateFieldListFilter),
    ]
    search_fields = ["object_id", "object_repr"]
    search_help_text = "The object's id or name."
    date_hierarchy = "created_at"
    list_select_related = ["actor"]
    fields = [
        "created_at",
        "actor",
        "ip_address",
        "action",
        "object_type",
        "object_link",
        "object_repr",
        "changes_pretty",
    ]

    @admin.display(description="object", ordering="object_id")
    def object_link(self, obj: AuditEvent) -> str:
        text = obj.object_repr or obj.object_id
        app_label, _, model_name = obj.object_type.partition(".")
        if obj.action.endswith(".delete") or not self._has_admin_page(app_label, model_name):
            return str(text) if text else "-"
        return _change_link(app_label, model_name, obj.object_id, text)

    @admin.display(description="changes")
    def changes_pretty(self, obj: AuditEvent) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.changes, indent=2, sort_keys=True, ensure_ascii=False))

    def _has_admin_page(self, app_label: str, model_name: str) -> bool:
        try:
            model = apps.get_model(app_label, model_name)
        except (LookupError, ValueError):
            return False
        return self.admin_site.is_registered(model)


import gateway_stats.admin_live  # noqa: E402, F401 - registers the live traffic page
import gateway_stats.admin_rollups  # noqa: E402, F401 - registers the rollup re-run page
