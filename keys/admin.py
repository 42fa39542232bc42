"""Django admin for API keys: issue (secret shown once, on the page answering the form), limit, rotate,
disable, enable, revoke. Every write goes through ``keys.services``; digests are never shown or editable.
The list shows each key's state as a badge (active / disabled / expired / revoked); the add page picks the owner
with an autocomplete. The change page shows the current budget period's spend and the key's last errors (both from
the usage ledger, read-only) and when it was last used.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, QuerySet, Sum
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.cache import patch_cache_control
from django.utils.formats import localize
from django.utils.html import format_html, format_html_join
from unfold.admin import ModelAdmin
from unfold.decorators import display
from unfold.widgets import UnfoldAdminSelect2MultipleWidget

from apiforge.audit import audit_context
from gateway_stats.dashboard import key_usage_charts, money_text
from gateway_stats.models import UsageRecord
from keys.models import ApiKey
from keys.scopes import SCOPE_FIELDS, scope_errors, scope_names_known
from keys.selectors import BudgetSpent, key_budget_spent_many
from keys.services import (
    ROTATION_GRACE_MAX_S,
    UPDATABLE_FIELDS,
    KeyIssued,
    key_create,
    key_delete,
    key_disable,
    key_enable,
    key_revoke,
    key_rotate,
    key_update,
)

_LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "max_concurrency", "budget_tokens", "budget_cost", "budget_period")
_BUDGET_STATE_FIELDS = ("budget_spent", "budget_remaining", "budget_resets_at")
_RECENT_ERRORS = 10
_MINUTE = timedelta(minutes=1)
# Badge colours (Unfold label types); a disabled key is switched off on purpose, so it stays grey.
_STATE_LABELS = {"active": "success", "expired": "warning", "revoked": "danger"}


def key_state(key: ApiKey) -> str:
    """What a caller holding this key gets: revoked and expired win over disabled, which wins over active."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= timezone.now():
        return "expired"
    return "active" if key.is_active else "disabled"


class _ListFormField(forms.CharField):
    """A list of strings edited as text, one entry per line or separated by commas."""

    widget = forms.Textarea(attrs={"rows": 2, "cols": 60})

    def prepare_value(self, value: Any) -> Any:
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        text = super().to_python(value) or ""
        return [item for item in re.split(r"[\s,]+", text) if item]


class _ScopeField(forms.MultipleChoiceField):
    """Names picked from those that exist (the form sets the choices); the names a key already holds stay
    listed even when they no longer exist, and unknown names are ``scope_errors``' to report."""

    widget = UnfoldAdminSelect2MultipleWidget

    def to_python(self, value: Any) -> list[str]:
        return [name for name in super().to_python(value) if name]

    def valid_value(self, value: str) -> bool:
        return isinstance(value, str)


class ApiKeyAdminForm(forms.ModelForm):
    allowed_models = _ScopeField(required=False, help_text="The public models this key may call; none = all.")
    allowed_routes = _ScopeField(required=False, help_text="The gateway routes this key may call; none = all.")
    ip_allowlist = _ListFormField(required=False, help_text="IPv4/IPv6 addresses or CIDR networks; empty = any.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for kind, field in SCOPE_FIELDS.items():
            held = list(self.initial.get(field) or [])
            names = list(dict.fromkeys([*scope_names_known(kind), *held]))
            self.fields[field].choices = [(name, name) for name in names]  # type: ignore[attr-defined]

    class Meta:
        model = ApiKey
        fields = [
            "owner",
            "name",
            "is_active",
            "expires_at",
            "allowed_models",
            "allowed_routes",
            "ip_allowlist",
            "rpm_limit",
            "tpm_limit",
            "max_concurrency",
            "budget_tokens",
            "budget_cost",
            "budget_period",
            "metadata",
        ]

    def clean(self) -> dict[str, Any]:
        # The rules key_create/key_update would refuse with, reported on the form instead of as an error page.
        cleaned: dict[str, Any] = super().clean() or {}
        expires_at = cleaned.get("expires_at")
        if "expires_at" in self.changed_data and expires_at is not None and expires_at <= timezone.now():
            self.add_error("expires_at", "The expiry must be in the future.")
        if self.instance.pk and self.instance.revoked_at is not None and cleaned.get("is_active"):
            self.add_error("is_active", "A revoked key cannot be enabled again.")
        for field, error in scope_errors(cleaned).items():
            self.add_error(field, error)
        return cleaned


class RotateForm(forms.Form):
    grace_seconds = forms.IntegerField(
        min_value=0,
        max_value=ROTATION_GRACE_MAX_S,
        initial=0,
        help_text="How long the current secret keeps working after the rotation, in seconds (0 = stops at once).",
    )


@admin.register(ApiKey)
class ApiKeyAdmin(ModelAdmin):
    form = ApiKeyAdminForm
    list_display = [
        "prefix",
        "name",
        "owner",
        "state",
        "expires_at",
        "last_used_at",
        "limits",
        "budget",
        "spent",
        "created_at",
    ]
    list_display_links = ["prefix", "name"]
    list_select_related = ["owner"]
    list_filter = [
        "is_active",
        ("revoked_at", admin.EmptyFieldListFilter),
        ("expires_at", admin.DateFieldListFilter),
        ("last_used_at", admin.DateFieldListFilter),
        "budget_period",
    ]
    search_fields = ["name", "prefix", "owner__username", "owner__email"]
    autocomplete_fields = ["owner"]
    date_hierarchy = "created_at"
    actions = ["disable_keys", "enable_keys", "revoke_keys"]
    readonly_fields = [
        "prefix",
        "created_at",
        "updated_at",
        "last_used_at",
        "revoked_at",
        "previous_valid_until",
        "recent_errors",
        "usage_charts",
        "limit_headroom",
        *_BUDGET_STATE_FIELDS,
    ]
    fieldsets = [
        (None, {"fields": ["owner", "name", "prefix", "is_active", "expires_at"]}),
        ("Scopes", {"fields": ["allowed_models", "allowed_routes", "ip_allowlist"]}),
        ("Limits and budget", {"fields": [*_LIMIT_FIELDS, *_BUDGET_STATE_FIELDS, "limit_headroom"]}),
        ("Usage (last 30 days)", {"fields": ["usage_charts"]}),
        ("Recent activity", {"fields": ["last_used_at", "recent_errors"]}),
        ("Other", {"fields": ["metadata"]}),
        ("History", {"fields": ["created_at", "updated_at", "revoked_at", "previous_valid_until"]}),
    ]
    add_fieldsets = [
        (None, {"fields": ["owner", "name", "is_active", "expires_at"]}),
        ("Scopes", {"fields": ["allowed_models", "allowed_routes", "ip_allowlist"]}),
        ("Limits and budget", {"fields": _LIMIT_FIELDS}),
        ("Other", {"fields": ["metadata"]}),
    ]

    @display(description="state", label=_STATE_LABELS)
    def state(self, obj: ApiKey) -> str:
        return key_state(obj)

    @admin.display(description="limits")
    def limits(self, obj: ApiKey) -> str:
        parts = [
            f"{obj.rpm_limit:,} rpm" if obj.rpm_limit is not None else "",
            f"{obj.tpm_limit:,} tpm" if obj.tpm_limit is not None else "",
            f"{obj.max_concurrency:,} at once" if obj.max_concurrency is not None else "",
        ]
        return " · ".join(part for part in parts if part) or "-"

    @admin.display(description="spent this period")
    def spent(self, obj: ApiKey) -> str:
        spent = self._spent(obj)
        return f"{money_text(spent.cost)} · {spent.tokens:,} tokens"

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        """The page's keys get their spend this period from one ledger query (the ``spent`` column)."""
        changelist = super().get_changelist_instance(request)
        page = list(changelist.result_list)  # evaluated here: the rows the page then draws are these objects
        spent = key_budget_spent_many(page)
        for key in page:
            key._budget_spent = spent[key.pk]
        return changelist

    @admin.display(description="budget")
    def budget(self, obj: ApiKey) -> str:
        parts = []
        if obj.budget_tokens is not None:
            parts.append(f"{obj.budget_tokens} tokens")
        if obj.budget_cost is not None:
            parts.append(f"{obj.budget_cost} cost")
        return f"{' / '.join(parts)} per {obj.budget_period}" if parts else "-"

    # --- the current budget period, from the ledger (one query per page, kept on the object) ------------------
    @staticmethod
    def _spent(obj: ApiKey) -> BudgetSpent:
        spent: BudgetSpent | None = getattr(obj, "_budget_spent", None)
        if spent is None:
            spent = key_budget_spent_many([obj])[obj.pk]
            obj._budget_spent = spent  # type: ignore[attr-defined]
        return spent

    @admin.display(description="spent this period")
    def budget_spent(self, obj: ApiKey) -> str:
        spent = self._spent(obj)
        return f"{spent.tokens:,} tokens, {money_text(spent.cost)} cost"

    @admin.display(description="remaining this period")
    def budget_remaining(self, obj: ApiKey) -> str:
        spent = self._spent(obj)
        parts = []
        if spent.remaining_tokens is not None:
            parts.append(f"{spent.remaining_tokens:,} tokens")
        if spent.remaining_cost is not None:
            parts.append(f"{money_text(spent.remaining_cost)} cost")
        return ", ".join(parts) if parts else "- (no budget)"

    @admin.display(description="budget resets at")
    def budget_resets_at(self, obj: ApiKey) -> Any:
        resets_at = self._spent(obj).resets_at
        return "never (total)" if resets_at is None else resets_at

    @admin.display(description="rate-limit headroom")
    def limit_headroom(self, obj: ApiKey) -> str:
        """The last minute's calls and tokens (from the ledger) against the per-minute limits."""
        if obj.rpm_limit is None and obj.tpm_limit is None:
            return "- (no per-minute limit)"
        used = UsageRecord.objects.filter(key_id=obj.pk, started_at__gte=timezone.now() - _MINUTE).aggregate(
            calls=Count("id"), tokens=Sum("total_tokens")
        )
        parts = []
        for limit, spent, unit in (
            (obj.rpm_limit, used["calls"], "requests"),
            (obj.tpm_limit, used["tokens"], "tokens"),
        ):
            if limit is not None:
                parts.append(f"{max(0, limit - (spent or 0)):,} of {limit:,} {unit} left")
        return "; ".join(parts) + " (the last minute's calls in the request log)"

    @admin.display(description="usage")
    def usage_charts(self, obj: ApiKey) -> str:
        if obj.pk is None:
            return "-"
        had_calls, charts = key_usage_charts(key_id=obj.pk, now=timezone.now())
        if not had_calls:
            return "No calls in the last 30 days."
        return format_html_join(
            "", "{}", ((render_to_string("admin/dashboard/chart.html", {"chart": c}),) for c in charts)
        )

    @admin.display(description=f"last {_RECENT_ERRORS} errors")
    def recent_errors(self, obj: ApiKey) -> str:
        """The key's latest calls answered with a status of 400 or more, each linked to its request log page."""
        rows = UsageRecord.objects.filter(key_id=obj.pk, status__gte=400).order_by("-started_at", "-id")
        lines = format_html_join(
            "",
            '<li><a href="{}">{} &middot; {} &middot; {}</a></li>',
            (
                (
                    reverse("admin:gateway_stats_usagerecord_change", args=[row.pk]),
                    localize(timezone.localtime(row.started_at)),
                    row.status,
                    row.error_code or "-",
                )
                for row in rows.only("id", "started_at", "status", "error_code")[:_RECENT_ERRORS]
            ),
        )
        return format_html("<ul>{}</ul>", lines) if lines else "none"

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return self.add_fieldsets if obj is None else self.fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        # The owner is chosen once; moving a key between users would move its usage history too.
        return self.readonly_fields if obj is None else [*self.readonly_fields, "owner"]

    # --- writes through the services -----------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            changes = {field: form.cleaned_data[field] for field in form.changed_data if field in UPDATABLE_FIELDS}
            key_update(key=obj, changes=changes, **audit_context(request).service_kwargs())
            return
        values = {field: value for field, value in form.cleaned_data.items() if field != "owner"}
        issued = key_create(owner=form.cleaned_data["owner"], **audit_context(request).service_kwargs(), **values)
        # The admin goes on with ``obj`` (history entry, next page): give it the saved row's identity.
        obj.pk = issued.key.pk
        obj.prefix = issued.key.prefix
        obj.created_at = issued.key.created_at
        obj._state.adding = False
        request._apiforge_issued = issued  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        issued: KeyIssued | None = getattr(request, "_apiforge_issued", None)
        if issued is None:
            return super().response_add(request, obj, post_url_continue)
        return self._issued_page(request, issued, title="API key created")

    def _issued_page(self, request: HttpRequest, issued: KeyIssued, *, title: str) -> HttpResponse:
        """The secret, once: rendered into this answer only, never stored in a session, message or cookie."""
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": title,
            "key": issued.key,
            "secret": issued.secret,
            "change_url": reverse("admin:keys_apikey_change", args=[issued.key.pk]),
        }
        response = TemplateResponse(request, "admin/keys/apikey/issued.html", context)
        patch_cache_control(response, no_store=True)
        return response

    def delete_model(self, request: HttpRequest, obj: ApiKey) -> None:
        key_delete(key=obj, **audit_context(request).service_kwargs())

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        audit = audit_context(request).service_kwargs()
        for key in queryset:
            key_delete(key=key, **audit)

    # --- actions ---------------------------------------------------------------------------------------
    @admin.action(description="Disable selected keys", permissions=["change"])
    def disable_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        audit = audit_context(request).service_kwargs()
        for key in queryset:
            key_disable(key=key, **audit)
        self.message_user(request, f"Disabled {len(queryset)} key(s).", messages.SUCCESS)

    @admin.action(description="Enable selected keys", permissions=["change"])
    def enable_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        enabled = skipped = 0
        audit = audit_context(request).service_kwargs()
        for key in queryset:
            try:
                key_enable(key=key, **audit)
                enabled += 1
            except ValidationError:
                skipped += 1
        self.message_user(request, f"Enabled {enabled} key(s).", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"Skipped {skipped} revoked key(s): they cannot be enabled.", messages.WARNING)

    @admin.action(description="Revoke selected keys (for good)", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        audit = audit_context(request).service_kwargs()
        for key in queryset:
            key_revoke(key=key, **audit)
        self.message_user(request, f"Revoked {len(queryset)} key(s).", messages.SUCCESS)

    # --- rotation ------------------------------------------------------------------------------------------
    def get_urls(self) -> list[URLPattern]:
        rotate = path(
            "<path:object_id>/rotate/", self.admin_site.admin_view(self.rotate_view), name="keys_apikey_rotate"
        )
        return [rotate, *super().get_urls()]

    def rotate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        key = get_object_or_404(ApiKey, pk=object_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        form = RotateForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                issued = key_rotate(
                    key=key,
                    grace_seconds=form.cleaned_data["grace_seconds"],
                    **audit_context(request).service_kwargs(),
                )
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
                return HttpResponseRedirect(reverse("admin:keys_apikey_change", args=[key.pk]))
            return self._issued_page(request, issued, title="API key rotated")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Rotate {key}",
            "key": key,
            "form": form,
            "change_url": reverse("admin:keys_apikey_change", args=[key.pk]),
        }
        return TemplateResponse(request, "admin/keys/apikey/rotate.html", context)
