"""Admin for gateway routes, with their targets inline: the live health and breaker state of each target shown
read-only, and actions to activate, deactivate, drain and restore.

Every write goes through ``proxy.route_services`` (validation, leases, audit, the gateway catalog's
invalidation): the route form checks with ``route_validate``, the inline rows with ``targets_errors``, and the
route and its targets are written together by one service call once both are valid (``save_related``).
Registered by the import at the end of ``proxy/admin.py``.
"""

from __future__ import annotations

import copy
import re
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet
from django.forms.models import construct_instance
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from unfold.admin import ModelAdmin, TabularInline

from apiforge.audit import audit_context
from proxy.admin_formsets import ServiceSavedInlineFormSet
from proxy.edge import breaker as edge_breaker
from proxy.models import Route, RouteTarget
from proxy.route_selectors import route_list_for_admin
from proxy.route_services import (
    ROUTE_FIELDS,
    TargetSpec,
    route_activate,
    route_create,
    route_delete,
    route_targets_health_set,
    route_update,
    route_validate,
    targets_errors,
)

_JSON_FIELDS = ("path_rewrite", "request_headers", "response_headers", "fallback", "health_check")


def target_live_state(target: RouteTarget) -> tuple[str, str]:
    """(health, breaker state) of a target as the gateway sees it now: the active checks' word ("healthy",
    "unhealthy" or "unknown") and the breaker's ("closed", "open", "half_open")."""
    key = edge_breaker.route_target_key(target.pk)
    return edge_breaker.health_view(key), edge_breaker.breaker_view(key).state


class _ListFormField(forms.CharField):
    """A list of strings edited as text, separated by commas or whitespace."""

    widget = forms.TextInput(attrs={"size": 60})

    def prepare_value(self, value: Any) -> Any:
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        text = super().to_python(value) or ""
        return [item for item in re.split(r"[\s,]+", text) if item]


def _errors_add(form: forms.BaseForm, exc: ValidationError) -> None:
    """A service's errors onto the form: a dotted path on its top-level field; fields that already failed keep
    only their own error."""
    for path, messages_ in exc.message_dict.items():
        field = path.split(".", 1)[0]
        target = field if field in form.fields else None
        if target is not None and target not in form.cleaned_data:
            continue
        for message in messages_:
            form.add_error(target, message if target is not None or "." not in path else f"{path}: {message}")


class RouteAdminForm(forms.ModelForm):
    methods = _ListFormField(required=False, help_text="HTTP methods, e.g. GET, POST; empty = all.")
    hosts = _ListFormField(required=False, help_text="Host names the route answers for; empty = any.")

    class Meta:
        model = Route
        fields = list(ROUTE_FIELDS)

    def _json(self, field: str) -> Any:
        value = self.cleaned_data.get(field)
        return {} if value in (None, "") else value

    def clean_path_rewrite(self) -> Any:
        return self._json("path_rewrite")

    def clean_request_headers(self) -> Any:
        return self._json("request_headers")

    def clean_response_headers(self) -> Any:
        return self._json("response_headers")

    def clean_fallback(self) -> Any:
        return self._json("fallback")

    def clean_health_check(self) -> Any:
        return self._json("health_check")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        # The service's rules, on a copy (the form fills in self.instance only after clean()).
        candidate = construct_instance(self, copy.copy(self.instance), fields=list(ROUTE_FIELDS))
        try:
            route_validate(route=candidate, model_checks=False)
        except ValidationError as exc:
            _errors_add(self, exc)
        return cleaned

    def route_fields(self, *, changed_only: bool) -> dict[str, Any]:
        names = [name for name in ROUTE_FIELDS if not changed_only or name in self.changed_data]
        return {name: self.cleaned_data[name] for name in names}


class RouteTargetForm(forms.ModelForm):
    # Checked by the service's rules (targets_errors), not Django's URLValidator (which refuses hosts such as
    # "orders_1" that the gateway can reach, and takes user info the gateway refuses).
    url = forms.CharField(max_length=500, help_text="Base URL, e.g. http://orders-1.internal:8080")

    class Meta:
        model = RouteTarget
        fields = ["url", "weight", "health"]


class RouteTargetInlineFormSet(ServiceSavedInlineFormSet):
    """The inline rows as the service's ``TargetSpec``s, checked by the service's rules."""

    def target_specs(self) -> list[TargetSpec]:
        """The rows that stay (filled in, not marked for deletion)."""
        return [
            TargetSpec(
                url=form.cleaned_data["url"], weight=form.cleaned_data["weight"], health=form.cleaned_data["health"]
            )
            for form in self.forms
            if form.cleaned_data and not self._deleting(form)
        ]

    def clean(self) -> None:
        super().clean()
        if any(form.errors for form in self.forms):
            return
        errors = targets_errors(self.target_specs())
        if errors:
            raise ValidationError(
                [
                    f"{path.removeprefix('targets').lstrip('.') or 'targets'}: {m}"
                    for path, ms in errors.items()
                    for m in ms
                ]
            )


class RouteTargetInline(TabularInline):
    model = RouteTarget
    form = RouteTargetForm
    formset = RouteTargetInlineFormSet
    extra = 1
    min_num = 1
    validate_min = True
    fields = ["url", "weight", "health", "live_health", "breaker"]
    readonly_fields = ["live_health", "breaker"]

    @admin.display(description="live health")
    def live_health(self, obj: RouteTarget) -> str:
        return target_live_state(obj)[0] if obj.pk else "-"

    @admin.display(description="breaker")
    def breaker(self, obj: RouteTarget) -> str:
        return target_live_state(obj)[1] if obj.pk else "-"


class LeaseFilter(admin.SimpleListFilter):
    title = "lease"
    parameter_name = "lease"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("running", "Running"), ("expired", "Expired"), ("none", "No lease")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Route]) -> QuerySet[Route]:
        now = timezone.now()
        if self.value() == "running":
            return queryset.filter(lease_expires_at__gte=now)
        if self.value() == "expired":
            return queryset.filter(Q(lease_expires_at__lt=now) | Q(deactivated_reason="lease_expired"))
        if self.value() == "none":
            return queryset.filter(lease_expires_at__isnull=True)
        return queryset


def _lease_state(route: Route) -> str:
    if route.lease_expires_at is None:
        return "no lease"
    left = route.lease_expires_at - timezone.now()
    if left <= timedelta(0):
        return "expired (deactivated)" if route.deactivated_reason == "lease_expired" else "expired"
    return f"{int(left.total_seconds())} s left of {route.ttl_s} s"


@admin.register(Route)
class RouteAdmin(ModelAdmin):
    form = RouteAdminForm
    inlines = [RouteTargetInline]
    list_display = ["name", "path", "version", "auth", "target_count", "is_active", "lease", "deprecated", "updated_at"]
    list_filter = ["is_active", LeaseFilter, "auth", "deprecated", "balancer", "deactivated_reason"]
    search_fields = ["name", "path", "targets__url"]
    actions = ["activate_routes", "deactivate_routes", "drain_targets", "restore_targets"]
    readonly_fields = [
        "lease_expires_at",
        "deactivated_reason",
        "registered_by_key_id",
        "target_state",
        "created_at",
        "updated_at",
    ]
    fieldsets = [
        (None, {"fields": ["name", "path", "version", "methods", "hosts", "auth", "is_active", "deactivated_reason"]}),
        (
            "Forwarding",
            {
                "fields": [
                    "balancer",
                    "strip_path",
                    "path_rewrite",
                    "timeout_s",
                    "retries",
                    "retry_non_idempotent",
                    "max_body_bytes",
                    "rate_limit_rpm",
                ]
            },
        ),
        ("Transforms", {"fields": ["request_headers", "response_headers"]}),
        (
            "Health, breaker and degradation",
            {
                "fields": [
                    "health_check",
                    "breaker_failure_threshold",
                    "breaker_cooldown_s",
                    "breaker_half_open_requests",
                    "fallback",
                    "target_state",
                ]
            },
        ),
        ("Versioning", {"fields": ["deprecated", "sunset_at"]}),
        ("Lease", {"fields": ["ttl_s", "lease_expires_at", "registered_by_key_id"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Route]:
        return route_list_for_admin()

    @admin.display(description="targets", ordering="target_count")
    def target_count(self, obj: Route) -> int:
        return int(getattr(obj, "target_count", 0))

    @admin.display(description="lease", ordering="lease_expires_at")
    def lease(self, obj: Route) -> str:
        return _lease_state(obj)

    @admin.display(description="targets now")
    def target_state(self, obj: Route) -> str:
        if obj.pk is None:
            return "-"
        rows = [(t.url, t.weight, t.health, *target_live_state(t)) for t in obj.targets.order_by("pk")]
        return format_html(
            "<table><thead><tr><th>URL</th><th>weight</th><th>stored health</th><th>live health</th>"
            "<th>breaker</th></tr></thead><tbody>{}</tbody></table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )

    # --- writes through the services ----------------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: Route, form: forms.ModelForm, change: bool) -> None:
        # Written in save_related, with the inline targets, in one service call (a route needs its targets).
        pass

    def save_related(self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool) -> None:
        assert isinstance(form, RouteAdminForm)  # noqa: S101 - this admin always uses that form
        targets: list[TargetSpec] | None = None
        for formset in formsets:
            if isinstance(formset, RouteTargetInlineFormSet):
                formset.history_note()
                if not change or formset.has_changed():
                    targets = formset.target_specs()
        audit = audit_context(request).service_kwargs()
        if change:
            saved = route_update(
                route=Route.objects.get(pk=form.instance.pk),
                data=form.route_fields(changed_only=True),  # type: ignore[arg-type]
                targets=targets,
                **audit,
            )
        else:
            saved = route_create(data=form.route_fields(changed_only=False), targets=targets or [], **audit)  # type: ignore[arg-type]
        # The admin goes on with form.instance (messages, redirect, its own LogEntry).
        obj = form.instance
        obj.pk = saved.pk
        obj._state.adding = False
        obj.lease_expires_at, obj.deactivated_reason = saved.lease_expires_at, saved.deactivated_reason
        obj.created_at, obj.updated_at = saved.created_at, saved.updated_at

    def delete_model(self, request: HttpRequest, obj: Route) -> None:
        route_delete(route=obj, **audit_context(request).service_kwargs())

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        audit = audit_context(request).service_kwargs()
        for route in queryset:
            route_delete(route=route, **audit)

    # --- actions ------------------------------------------------------------------------------------------
    @admin.action(description="Activate selected routes", permissions=["change"])
    def activate_routes(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        audit = audit_context(request).service_kwargs()
        for route in queryset:
            route_activate(route=route, active=True, **audit)
        self.message_user(request, f"Activated {len(queryset)} route(s).", messages.SUCCESS)

    @admin.action(description="Deactivate selected routes", permissions=["change"])
    def deactivate_routes(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        audit = audit_context(request).service_kwargs()
        for route in queryset:
            route_activate(route=route, active=False, **audit)
        self.message_user(request, f"Deactivated {len(queryset)} route(s).", messages.SUCCESS)

    @admin.action(description="Drain the targets of selected routes (no new calls)", permissions=["change"])
    def drain_targets(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        audit = audit_context(request).service_kwargs()
        changed = sum(route_targets_health_set(route=route, health="drained", **audit) for route in queryset)
        self.message_user(request, f"Drained {changed} target(s).", messages.SUCCESS)

    @admin.action(description="Restore the drained targets of selected routes", permissions=["change"])
    def restore_targets(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        audit = audit_context(request).service_kwargs()
        changed = sum(
            route_targets_health_set(route=route, health="healthy", only="drained", **audit) for route in queryset
        )
        self.message_user(request, f"Restored {changed} target(s).", messages.SUCCESS)
