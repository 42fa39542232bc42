"""Admin for gateway routes, with their targets inline: the live health and breaker state of each target shown
read-only, and actions to activate, deactivate, drain and restore.

The change page is the route's control room: the last 24 h of its traffic from the ledger and each target's
breaker and health verdict (``proxy.route_ops``), buttons (Unfold's ``actions_detail``, each behind a
confirmation dialog that POSTs) to reset the breakers, run the health check now, test the connection and
extend the lease, and a drain / restore button on each target row (posted to ``target_health_view``). The
changelist has the same operations as bulk actions. Every operation is audited by its service.

Every write goes through ``proxy.route_services`` (validation, leases, audit, the gateway catalog's
invalidation): the route form checks with ``route_validate``, the inline rows with ``targets_errors``, and the
route and its targets are written together by one service call once both are valid (``save_related``).
Registered by the import at the end of ``proxy/admin.py``.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Q, QuerySet
from django.forms.models import construct_instance
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, reverse
from django.urls import path as url_pattern
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from unfold.admin import ModelAdmin, TabularInline
from unfold.decorators import action
from unfold.enums import ActionVariant
from unfold.widgets import (
    UnfoldAdminDecimalFieldWidget,
    UnfoldAdminIntegerFieldWidget,
    UnfoldAdminTextareaWidget,
    UnfoldAdminTextInputWidget,
)

from apiforge.audit import audit_context
from apiforge.local_cache import CacheUnavailable
from proxy.admin_formsets import ServiceSavedInlineFormSet
from proxy.edge import breaker as edge_breaker
from proxy.models import Route, RouteTarget
from proxy.route_ops import (
    NoHealthCheck,
    ProbeResult,
    route_breakers_reset,
    route_connection_test,
    route_health_check_run,
    route_traffic,
    target_states,
)
from proxy.route_selectors import route_list_for_admin
from proxy.route_services import (
    ROUTE_FIELDS,
    TargetSpec,
    route_activate,
    route_create,
    route_delete,
    route_lease_extend,
    route_target_health_set,
    route_targets_health_set,
    route_update,
    route_validate,
    targets_errors,
)

_RESET_TEXT = (
    "Close the breaker of every target of this route and forget their health verdicts, on every worker. "
    "Calls go to the targets again at once."
)
_CHECK_TEXT = (
    "Probe every target (drained ones excepted) with the route's health check now and record each result as "
    "the target's verdict at once."
)
_TEST_TEXT = (
    "Probe every target without recording anything: the health check's path and timeout, or GET / (any HTTP "
    "answer counts as connected) for a route without one."
)
_LEASE_TEXT = "Renew the lease: it then runs ttl_s seconds from now, as after a heartbeat of the service."


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


# The parts of a health check (``proxy.gateway_catalog.HealthCheck``): key, label, the checker's default.
_HEALTH_PARTS = (
    ("path", "Path (empty: no check)", None),
    ("interval_s", "Every (s)", 10),
    ("timeout_s", "Timeout (s)", 2),
    ("healthy", "Healthy after (successes)", 2),
    ("unhealthy", "Unhealthy after (failures)", 3),
)


class _LabelledPartsWidget(forms.MultiWidget):
    """A JSON object edited as labelled inputs side by side, one per part (``part_labels``, in order)."""

    template_name = "admin/proxy/route/labelled_parts_widget.html"

    def part_labels(self) -> list[str]:
        raise NotImplementedError

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        for subwidget, label in zip(context["widget"]["subwidgets"], self.part_labels(), strict=True):
            subwidget["label"] = label
        return context


class _PartsField(forms.MultiValueField):
    """A model JSONField's form field built from ``parts`` (never required: all empty means {}). The JSON
    field's own options are dropped; the service's validation (through the form's ``clean``) checks the
    result."""

    def __init__(self, parts: tuple[forms.Field, ...], **kwargs: Any) -> None:
        for name in ("encoder", "decoder", "max_length"):
            kwargs.pop(name, None)
        super().__init__(parts, require_all_fields=False, **{**kwargs, "required": False})


class HealthCheckWidget(_LabelledPartsWidget):
    """The health check's five parts as labelled inputs (instead of a JSON text area)."""

    def __init__(self) -> None:
        step = {"step": "any", "min": "0"}
        super().__init__(
            [
                UnfoldAdminTextInputWidget(attrs={"placeholder": "/healthz"}),
                UnfoldAdminDecimalFieldWidget(attrs={**step, "placeholder": "10"}),
                UnfoldAdminDecimalFieldWidget(attrs={**step, "placeholder": "2"}),
                UnfoldAdminIntegerFieldWidget(attrs={"min": "1", "placeholder": "2"}),
                UnfoldAdminIntegerFieldWidget(attrs={"min": "1", "placeholder": "3"}),
            ]
        )

    def decompress(self, value: Any) -> list[Any]:
        if not isinstance(value, dict):
            return [None] * len(_HEALTH_PARTS)
        return [value.get(key) for key, _, _ in _HEALTH_PARTS]

    def part_labels(self) -> list[str]:
        return [label if default is None else f"{label}, default {default}" for _, label, default in _HEALTH_PARTS]


class HealthCheckField(_PartsField):
    """``{"path", "interval_s", "timeout_s", "healthy", "unhealthy"}`` from the widget's parts: {} when all are
    empty, only the parts given otherwise (the checker's defaults for the rest). Checked by the service's
    ``health_check_errors`` (through ``route_validate`` in the form's ``clean``), not here."""

    widget = HealthCheckWidget

    def __init__(self, **kwargs: Any) -> None:
        parts = (
            forms.CharField(required=False, strip=True),
            forms.FloatField(required=False),
            forms.FloatField(required=False),
            forms.IntegerField(required=False),
            forms.IntegerField(required=False),
        )
        super().__init__(parts, **kwargs)

    def compress(self, data_list: list[Any]) -> dict[str, Any]:
        config: dict[str, Any] = {}
        for (key, _, _), value in zip(_HEALTH_PARTS, data_list or [], strict=False):
            if value in (None, ""):
                continue
            config[key] = int(value) if isinstance(value, float) and value.is_integer() else value
        if config and "path" not in config:
            config["path"] = ""  # the service then says a check needs its path
        return config


# The parts of a fallback answer (``proxy.gateway_catalog.FallbackAnswer``): key, label.
_FALLBACK_PARTS = (
    ("status", "Status (empty: no fallback)"),
    ("body", "Body"),
    ("headers", "Headers, one “Name: value” per line"),
)


class FallbackWidget(_LabelledPartsWidget):
    """The fallback answer's status, body and headers as labelled inputs (instead of a JSON text area)."""

    def __init__(self) -> None:
        text = {"rows": 4, "cols": 48}
        super().__init__(
            [
                UnfoldAdminIntegerFieldWidget(attrs={"min": "100", "max": "599", "placeholder": "503"}),
                UnfoldAdminTextareaWidget(attrs={**text, "placeholder": '{"error": "orders is down, retry later"}'}),
                UnfoldAdminTextareaWidget(attrs={**text, "placeholder": "Retry-After: 30"}),
            ]
        )

    def decompress(self, value: Any) -> list[Any]:
        if not isinstance(value, dict) or not value:
            return [None, "", ""]
        body = value.get("body", "")
        headers = value.get("headers")
        return [
            value.get("status"),
            body if isinstance(body, str) else json.dumps(body, indent=2, ensure_ascii=False),
            "\n".join(f"{name}: {text}" for name, text in headers.items()) if isinstance(headers, dict) else "",
        ]

    def part_labels(self) -> list[str]:
        return [label for _, label in _FALLBACK_PARTS]


def _header_lines(text: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise ValidationError(f"headers, line {number}: write “Name: value” (got “{line.strip()[:60]}”).")
        headers[name.strip()] = value.strip()
    return headers


class FallbackField(_PartsField):
    """``{"status", "body", "headers"}`` from the widget's parts: {} when all are empty. A body that is a JSON
    object or array is kept as JSON (answered as application/json), any other text as a string (text/plain).
    Checked by the service's ``fallback_errors`` (through ``route_validate`` in the form's ``clean``)."""

    widget = FallbackWidget

    def __init__(self, **kwargs: Any) -> None:
        parts = (
            forms.IntegerField(required=False),
            forms.CharField(required=False, strip=False),
            forms.CharField(required=False),
        )
        super().__init__(parts, **kwargs)

    def compress(self, data_list: list[Any]) -> dict[str, Any]:
        status, body, headers = (list(data_list or []) + [None, "", ""])[:3]
        headers = _header_lines(headers or "")
        if status is None and not (body or "").strip() and not headers:
            return {}
        config: dict[str, Any] = {"status": status}  # None: the service says a fallback needs its status
        if (body or "").strip():
            config["body"] = _json_body(body)
        if headers:
            config["headers"] = headers
        return config


def _json_body(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict | list) else text


class RouteAdminForm(forms.ModelForm):
    methods = _ListFormField(required=False, help_text="HTTP methods, e.g. GET, POST; empty = all.")
    hosts = _ListFormField(required=False, help_text="Host names the route answers for; empty = any.")
    health_check = HealthCheckField(
        help_text="Each target gets GET (its URL and the path) every interval; a 2xx or 3xx in time is a success."
    )
    fallback = FallbackField(
        help_text="Answered when no target can (all down, drained or open): a JSON object or array as the body is "
        "sent as application/json, other text as text/plain, unless a Content-Type header says otherwise."
    )

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
    fields = ["url", "weight", "health", "live_health", "breaker", "control"]
    readonly_fields = ["live_health", "breaker", "control"]

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = super().get_fields(request, obj)
        # The drain / restore buttons only for those who may use them.
        return fields if self.has_change_permission(request, obj) else [f for f in fields if f != "control"]

    @admin.display(description="live health")
    def live_health(self, obj: RouteTarget) -> str:
        return target_live_state(obj)[0] if obj.pk else "-"

    @admin.display(description="breaker")
    def breaker(self, obj: RouteTarget) -> str:
        return target_live_state(obj)[1] if obj.pk else "-"

    @admin.display(description="drain / restore")
    def control(self, obj: RouteTarget) -> str:
        """A button posting the small form of ``change_form_outer_after_template`` (outside the change form, so
        Enter in a field still saves the route) to ``target_health_view``."""
        if not obj.pk:
            return "-"
        drained = obj.health == RouteTarget.Health.DRAINED
        operation = "restore" if drained or obj.health == RouteTarget.Health.UNHEALTHY else "drain"
        url = reverse("admin:proxy_route_target_health", args=(obj.route_id, obj.pk, operation))
        return format_html(
            '<button type="submit" form="route-target-operations" formaction="{}" '
            'class="border border-base-200 rounded-default px-2 py-1 text-xs font-medium hover:bg-base-100 '
            'dark:border-base-700 dark:hover:bg-base-800">{}</button>',
            url,
            "Restore" if operation == "restore" else "Drain",
        )


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
    actions = [
        "activate_routes",
        "deactivate_routes",
        "drain_targets",
        "restore_targets",
        "reset_breakers",
        "run_health_checks",
        "extend_leases",
    ]
    change_form_outer_after_template = "admin/proxy/route/target_operations_form.html"
    actions_detail = ["detail_reset_breakers", "detail_health_check", "detail_connection_test", "detail_lease_extend"]
    readonly_fields = [
        "operations_panel",
        "lease_expires_at",
        "deactivated_reason",
        "registered_by_key_id",
        "created_at",
        "updated_at",
    ]
    fieldsets = [
        ("Now: last 24 h and the targets' state", {"fields": ["operations_panel"]}),
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
                ]
            },
        ),
        ("Versioning", {"fields": ["deprecated", "sunset_at"]}),
        ("Lease", {"fields": ["ttl_s", "lease_expires_at", "registered_by_key_id"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Route]:
        return route_list_for_admin()

    def get_fieldsets(self, request: HttpRequest, obj: Route | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return [fs for fs in fieldsets if "operations_panel" not in fs[1]["fields"]]
        # The route's name heads its panel: the page header's breadcrumb is cut short beside the buttons.
        return [
            (f"“{obj.name}” now: last 24 h and the targets' state", options)
            if "operations_panel" in options["fields"]
            else (title, options)
            for title, options in fieldsets
        ]

    def get_urls(self) -> list[URLPattern]:
        extra = [
            url_pattern(
                "<int:route_id>/targets/<int:target_id>/<str:operation>/",
                self.admin_site.admin_view(self.target_health_view),
                name="proxy_route_target_health",
            )
        ]
        return extra + super().get_urls()

    @admin.display(description="targets", ordering="target_count")
    def target_count(self, obj: Route) -> int:
        return int(getattr(obj, "target_count", 0))

    @admin.display(description="lease", ordering="lease_expires_at")
    def lease(self, obj: Route) -> str:
        return _lease_state(obj)

    @admin.display(description="traffic and targets")
    def operations_panel(self, obj: Route) -> str:
        if obj.pk is None:
            return "-"
        traffic = route_traffic(route_name=obj.name)
        rate = "-" if traffic.error_rate is None else f"{traffic.error_rate:.1%}"
        cards = [
            ("Calls", f"{traffic.calls:,}"),
            ("Error rate", rate),
            ("Latency p50", _ms(traffic.p50_ms)),
            ("Latency p95", _ms(traffic.p95_ms)),
            ("Refused, no target available", f"{traffic.refused:,}"),
        ]
        rows = []
        now = timezone.now().timestamp()
        for target, verdict, view in target_states(obj.targets.order_by("pk")):
            opened = f"open for {max(view.open_until - now, 0):.0f} s more" if view.open_until else ""
            detail = ", ".join(
                part
                for part in (
                    opened,
                    f"{view.failures} failure(s) in a row" if view.failures else "",
                    f"trip {view.trips} in a row" if view.trips else "",
                )
                if part
            )
            rows.append((target.url, target.health, verdict, view.state, detail or "-"))
        return format_html(
            '<div class="flex flex-wrap gap-4 mb-4">{}</div>'
            '<table class="w-full text-sm"><thead><tr class="text-left">'
            '<th class="px-2 py-1">Target</th><th class="px-2 py-1">stored health</th>'
            '<th class="px-2 py-1">health check verdict</th><th class="px-2 py-1">breaker</th>'
            '<th class="px-2 py-1">breaker detail</th></tr></thead><tbody>{}</tbody></table>'
            '<p class="text-xs mt-2">Last 24 h from the request log, by route name. “Refused” counts the calls '
            "answered 503 <code>no_healthy_upstream</code>: no target could take them (breakers open, or every "
            "target drained or unhealthy). Breaker and verdict as this server sees them.</p>",
            format_html_join(
                "",
                '<div class="border border-base-200 rounded-default px-3 py-2 dark:border-base-700">'
                '<div class="text-xs">{}</div><div class="font-semibold text-base">{}</div></div>',
                cards,
            ),
            format_html_join("", "<tr>" + '<td class="px-2 py-1">{}</td>' * 5 + "</tr>", rows),
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

    @admin.action(description="Reset the circuit breakers of selected routes' targets", permissions=["change"])
    def reset_breakers(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        for route in queryset:
            self._reset_breakers(request, route)

    @admin.action(description="Run the health check of selected routes now", permissions=["change"])
    def run_health_checks(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        for route in queryset:
            self._health_check(request, route)

    @admin.action(description="Extend the lease of selected routes", permissions=["change"])
    def extend_leases(self, request: HttpRequest, queryset: QuerySet[Route]) -> None:
        for route in queryset:
            self._lease_extend(request, route)

    # --- the change page's buttons (a confirmation dialog each, submitted by POST) ---------------------------
    @action(
        description="Reset breakers",  # short labels: the page header keeps room for the route's name
        icon="restart_alt",
        permissions=["change"],
        url_path="reset-breakers",
        dialog={"title": "Reset circuit breakers", "description": _RESET_TEXT, "form_submit_text": "Reset"},
    )
    def detail_reset_breakers(self, request: HttpRequest, form: Any, object_id: str) -> HttpResponse:
        self._reset_breakers(request, self._route(object_id))
        return _back(request, object_id)

    @action(
        description="Check health",
        icon="ecg_heart",
        permissions=["change"],
        url_path="health-check",
        dialog={"title": "Run health check now", "description": _CHECK_TEXT, "form_submit_text": "Run"},
    )
    def detail_health_check(self, request: HttpRequest, form: Any, object_id: str) -> HttpResponse:
        self._health_check(request, self._route(object_id))
        return _back(request, object_id)

    @action(
        description="Test connection",
        icon="lan",
        permissions=["change"],
        url_path="connection-test",
        dialog={"title": "Test connection", "description": _TEST_TEXT, "form_submit_text": "Test"},
    )
    def detail_connection_test(self, request: HttpRequest, form: Any, object_id: str) -> HttpResponse:
        route = self._route(object_id)
        used, results = route_connection_test(route=route, **audit_context(request).service_kwargs())
        level = messages.SUCCESS if all(r.ok for r in results) else messages.WARNING
        self.message_user(request, _results_message(f"Connection test of “{route.name}” (GET {used}):", results), level)
        return _back(request, object_id)

    @action(
        description="Extend lease",
        icon="timer",
        permissions=["change"],
        url_path="lease-extend",
        variant=ActionVariant.DEFAULT,
        dialog={"title": "Extend lease", "description": _LEASE_TEXT, "form_submit_text": "Extend"},
    )
    def detail_lease_extend(self, request: HttpRequest, form: Any, object_id: str) -> HttpResponse:
        self._lease_extend(request, self._route(object_id))
        return _back(request, object_id)

    def target_health_view(
        self, request: HttpRequest, route_id: int, target_id: int, operation: str
    ) -> HttpResponseBase:
        """Drain or restore one target (POST from its row's button, CSRF-checked by the admin's view wrapper)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_change_permission(request):
            raise PermissionDenied
        target = get_object_or_404(RouteTarget.objects.select_related("route"), pk=target_id, route_id=route_id)
        back = reverse("admin:proxy_route_change", args=(route_id,))
        health = {"drain": RouteTarget.Health.DRAINED, "restore": RouteTarget.Health.HEALTHY}.get(operation)
        if health is None:
            self.message_user(request, f"Unknown operation “{operation}” (drain or restore).", messages.ERROR)
            return HttpResponseRedirect(back)
        changed = route_target_health_set(target=target, health=health, **audit_context(request).service_kwargs())
        done = "drained (no new calls)" if operation == "drain" else "restored (healthy)"
        if changed:
            self.message_user(request, f"Target {target.url} {done}.", messages.SUCCESS)
        else:
            self.message_user(request, f"Target {target.url} was already {health}: nothing changed.", messages.INFO)
        return HttpResponseRedirect(back)

    # --- the operations, for one route ----------------------------------------------------------------------
    def _route(self, object_id: str) -> Route:
        route = Route.objects.filter(pk=object_id).first() if str(object_id).isdigit() else None
        if route is None:
            raise Http404("No such route.")
        return route

    def _reset_breakers(self, request: HttpRequest, route: Route) -> None:
        try:
            before = route_breakers_reset(route=route, **audit_context(request).service_kwargs())
        except CacheUnavailable:
            self.message_user(
                request,
                f"“{route.name}”: breakers reset on this server only; Redis is unreachable, so the other workers "
                "keep theirs until it is back. Try again.",
                messages.ERROR,
            )
            return
        opened = sum(1 for view in before if view.state != "closed")
        self.message_user(
            request,
            f"“{route.name}”: reset the breakers of {len(before)} target(s) ({opened} were open or half-open).",
            messages.SUCCESS,
        )

    def _health_check(self, request: HttpRequest, route: Route) -> None:
        try:
            results = route_health_check_run(route=route, **audit_context(request).service_kwargs())
        except NoHealthCheck:
            self.message_user(
                request,
                f"“{route.name}” has no health check configured (health_check is empty): nothing to run. "
                "Set one, or use “Test connection”.",
                messages.WARNING,
            )
            return
        except CacheUnavailable:
            self.message_user(
                request,
                f"“{route.name}”: probed, but the verdicts reached this server only (Redis is unreachable).",
                messages.ERROR,
            )
            return
        probed = [r for r in results if not r.skipped]
        level = messages.SUCCESS if probed and all(r.ok for r in probed) else messages.WARNING
        self.message_user(request, _results_message(f"Health check of “{route.name}”:", results), level)

    def _lease_extend(self, request: HttpRequest, route: Route) -> None:
        if route.ttl_s is None:
            self.message_user(request, f"“{route.name}” has no lease (no ttl_s): nothing to extend.", messages.WARNING)
            return
        extended = route_lease_extend(route=route, **audit_context(request).service_kwargs())
        until = timezone.localtime(extended.lease_expires_at) if extended.lease_expires_at else None
        self.message_user(
            request,
            f"“{route.name}”: lease extended by {extended.ttl_s} s, to {until:%Y-%m-%d %H:%M:%S}."
            + ("" if extended.is_active else " The route stays inactive (deactivated by an operator)."),
            messages.SUCCESS,
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _results_message(title: str, results: list[ProbeResult]) -> SafeString:
    if not results:
        return format_html("{} the route has no targets.", title)
    return format_html("{}<br>{}", title, format_html_join("<br>", "{}", ((r.summary(),) for r in results)))


def _back(request: HttpRequest, object_id: str) -> HttpResponse:
    """Back to the change page: through HTMX's redirect header from the dialog, a plain redirect otherwise."""
    url = reverse("admin:proxy_route_change", args=(object_id,))
    if request.headers.get("HX-Request"):
        return HttpResponse(headers={"HX-Redirect": url})
    return HttpResponseRedirect(url)
