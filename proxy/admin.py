"""Admin for upstreams and models (with inline deployments).

The upstream's API key is write-only here too: a password field that is never
rendered back, a checkbox to clear it, and the ciphertext is never shown. Extra
header values are shown masked; leaving the mask keeps the stored value. Every
write goes through ``proxy.services``, a model's inline deployments too
(``model_deployments_update``, right after the model, in the same transaction).

The upstream pages are also the operators' control room (``proxy.upstream_ops``): the change page shows the
last 24 hours (calls, error rate, latency) and every deployment's breaker and health check now; the changelist
the same in compact columns; "Reset circuit breakers" and "Test connection" run on selected upstreams or from
the change page's buttons, each audited. A model's fallbacks are picked from the other models, in order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import ValidationError
from django.db.models import ForeignKey, Prefetch, QuerySet
from django.forms import ModelChoiceField
from django.forms.models import construct_instance
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.safestring import SafeString
from unfold.admin import ModelAdmin as UnfoldModelAdmin
from unfold.admin import TabularInline
from unfold.decorators import action
from unfold.forms import BaseDialogForm
from unfold.widgets import UnfoldAdminSelectWidget

from apiforge.audit import audit_context
from proxy.admin_formsets import ServiceSavedInlineFormSet
from proxy.models import Deployment, Model, Upstream
from proxy.selectors import model_list_for_admin
from proxy.services import (
    MODEL_FIELDS,
    UPSTREAM_FIELDS,
    DeploymentSpec,
    UpstreamFields,
    deployments_errors,
    extra_headers_masked,
    extra_headers_merge,
    model_create,
    model_delete,
    model_deployments_update,
    model_update,
    model_validate,
    upstream_create,
    upstream_delete,
    upstream_update,
    upstream_validate,
)
from proxy.upstream_ops import (
    ConnectionTest,
    UsageWindow,
    breakers_summary,
    upstream_breakers_reset,
    upstream_connection_test,
    upstream_panel,
    upstreams_usage,
)


def _errors_add(form: forms.BaseForm, exc: ValidationError) -> None:
    """A service's field errors onto the form (fields that already failed keep only their own error)."""
    for field, texts in exc.message_dict.items():
        target = field if field in form.fields else None
        if target is not None and target not in form.cleaned_data:
            continue
        for message in texts:
            form.add_error(target, message)


class _HttpsUrlField(forms.URLField):
    """A URL typed without a scheme is taken as https (Django 6's default, asked for now)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(assume_scheme="https", **kwargs)


class UpstreamAdminForm(forms.ModelForm):
    api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: stored encrypted, never shown. Leave empty to keep the current key.",
    )
    clear_api_key = forms.BooleanField(label="Clear API key", required=False)

    class Meta:
        model = Upstream
        fields = list(UPSTREAM_FIELDS)
        field_classes = {"base_url": _HttpsUrlField}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            # Header values may be credentials: show only the names; the mask keeps a value.
            self.initial["extra_headers"] = extra_headers_masked(self.instance.extra_headers or {})
            state = "An API key is stored." if self.instance.has_api_key else "No API key is stored."
            self.fields["api_key"].help_text = f"{state} {self.fields['api_key'].help_text}"

    def clean_extra_headers(self) -> Any:
        headers = self.cleaned_data.get("extra_headers")
        if isinstance(headers, dict) and self.instance.pk:
            return extra_headers_merge(current=self.instance.extra_headers or {}, wanted=headers)
        return headers

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("api_key") and cleaned.get("clear_api_key"):
            self.add_error("clear_api_key", "Either type a new key or clear it, not both.")
        # The service's rules, on a copy (the form fills in self.instance only after clean()).
        candidate = construct_instance(self, copy.copy(self.instance), fields=list(UPSTREAM_FIELDS))
        try:
            upstream_validate(upstream=candidate, model_checks=False)
        except ValidationError as exc:
            _errors_add(self, exc)
        return cleaned

    def upstream_fields(self, *, changed_only: bool) -> UpstreamFields:
        """What the service should write, from the cleaned form."""
        names = [f for f in UPSTREAM_FIELDS if not changed_only or f in self.changed_data]
        data: dict[str, Any] = {name: self.cleaned_data[name] for name in names}
        if self.cleaned_data.get("api_key"):
            data["api_key"] = self.cleaned_data["api_key"]
        elif self.cleaned_data.get("clear_api_key"):
            data["api_key"] = ""
        return data  # type: ignore[return-value]


def _percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:.1%}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.2f} ms"


def _test_message(request: HttpRequest, result: ConnectionTest) -> None:
    if result.ok:
        messages.success(request, result.message)
    elif result.status is not None or not result.url:  # not a 2xx, or nothing to call
        messages.warning(request, result.message)
    else:
        messages.error(request, result.message)


_RESET_DIALOG: Any = {
    "title": "Reset the circuit breakers",
    "description": "Close the breaker of every deployment of this upstream, on every worker, and forget the "
    "health checks' verdicts: the next calls go to it again.",
    "form_class": BaseDialogForm,
    "form_submit_text": "Reset",
}
# A POST too (it calls out and writes an audit event): never run by following a link.
_TEST_DIALOG: Any = {
    "title": "Test the connection",
    "description": "Call GET {base URL}/models with this upstream's API key, as the proxy sends it (the "
    "upstream's timeout, at most 10 s), and show the answer's status and time.",
    "form_class": BaseDialogForm,
    "form_submit_text": "Test",
}


@admin.register(Upstream)
class UpstreamAdmin(UnfoldModelAdmin):
    form = UpstreamAdminForm
    list_display = ["name", "kind", "is_active", "has_key", "base_url", "timeout_s", "max_retries", "updated_at"]
    list_filter = ["kind", "is_active"]
    search_fields = ["name", "base_url"]
    readonly_fields = ["created_at", "updated_at"]
    actions = ["reset_breakers", "test_connection"]
    actions_detail = ["reset_breakers_detail", "test_connection_detail"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "base_url", "is_active"]}),
        ("Credentials", {"fields": ["api_key", "clear_api_key", "extra_headers"]}),
        ("Timeouts and retries", {"fields": ["timeout_s", "max_retries"]}),
        ("Circuit breaker", {"fields": ["breaker_failure_threshold", "breaker_cooldown_s"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]
    # The change page's panel (the last day, the deployments now), full width above the form.
    change_form_outer_before_template = "admin/proxy/upstream/operations_card.html"

    # For staff who may only view: Django shows a read-only field's value, which for these is the decrypted key
    # and the header values. They see the credentials' state instead (None: not shown at all).
    view_only_fields: dict[str, str | None] = {
        "api_key": "api_key_state",
        "clear_api_key": None,
        "extra_headers": "extra_header_names",
    }

    def get_fieldsets(self, request: HttpRequest, obj: Upstream | None = None) -> Any:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is None or not obj.pk:
            return fieldsets
        if not self.has_change_permission(request, obj):
            fieldsets = [
                (title, {**options, "fields": [s for f in options["fields"] if (s := self.view_only_fields.get(f, f))]})
                for title, options in fieldsets
            ]
        return fieldsets

    @admin.display(description="API key")
    def api_key_state(self, obj: Upstream) -> str:
        return "An API key is stored." if obj.has_api_key else "No API key is stored."

    @admin.display(description="extra headers")
    def extra_header_names(self, obj: Upstream) -> str:
        return ", ".join(f"{name}: {value}" for name, value in extra_headers_masked(obj.extra_headers or {}).items())

    def get_queryset(self, request: HttpRequest) -> QuerySet[Upstream]:
        # The deployments' ids for the breakers column: one query for the page, not one per row.
        return (
            super()
            .get_queryset(request)
            .prefetch_related(Prefetch("deployments", queryset=Deployment.objects.only("pk", "upstream_id")))
        )

    def get_list_display(self, request: HttpRequest) -> Any:
        # The usage columns read one window for the whole page (computed when the first row asks for it).
        cache: list[UsageWindow] = []

        def window() -> UsageWindow:
            if not cache:
                cache.append(upstreams_usage())
            return cache[0]

        @admin.display(description="calls 24 h")
        def calls_24h(obj: Upstream) -> str:
            return f"{window().of(obj.name).calls:,}"

        @admin.display(description="errors 24 h")
        def errors_24h(obj: Upstream) -> str:
            return _percent(window().of(obj.name).error_rate)

        @admin.display(description="p95 24 h")
        def p95_24h(obj: Upstream) -> str:
            return _ms(window().of(obj.name).p95_ms)

        # Right after the upstream's identity, before its settings: what an operator scans the list for.
        columns = list(super().get_list_display(request))
        at = columns.index("has_key") + 1 if "has_key" in columns else len(columns)
        return [*columns[:at], calls_24h, errors_24h, p95_24h, "breakers", *columns[at:]]

    @admin.display(boolean=True, description="has key", ordering="api_key_encrypted")
    def has_key(self, obj: Upstream) -> bool:
        return obj.has_api_key

    @admin.display(description="breakers")
    def breakers(self, obj: Upstream) -> str:
        return breakers_summary(deployment.pk for deployment in obj.deployments.all())

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        def operations() -> SafeString | None:
            # Called by the template (once, and only when the page is drawn: not for a save that redirects).
            upstream = self.get_object(request, unquote(object_id))
            return None if upstream is None else self._operations_html(upstream)

        return super().change_view(request, object_id, form_url, {**(extra_context or {}), "operations": operations})

    def _operations_html(self, obj: Upstream) -> SafeString:
        panel = upstream_panel(upstream=obj)
        return render_to_string(
            "admin/proxy/upstream/operations.html",
            {
                "panel": panel,
                "error_rate": _percent(panel.usage.error_rate),
                "error_rate_5xx": _percent(panel.usage.error_rate_5xx),
                "p50": _ms(panel.usage.p50_ms),
                "p95": _ms(panel.usage.p95_ms),
                "rows": [(d, reverse("admin:proxy_model_change", args=[d.model_id])) for d in panel.deployments],
            },
        )

    def save_model(self, request: HttpRequest, obj: Upstream, form: forms.ModelForm, change: bool) -> None:
        assert isinstance(form, UpstreamAdminForm)  # noqa: S101 - this admin always uses that form
        audit = audit_context(request).service_kwargs()
        if change:
            saved = upstream_update(
                upstream=Upstream.objects.get(pk=obj.pk), data=form.upstream_fields(changed_only=True), **audit
            )
        else:
            saved = upstream_create(data=form.upstream_fields(changed_only=False), **audit)
        # The admin goes on with ``obj`` (messages, redirect, its own LogEntry).
        obj.pk = saved.pk
        obj.api_key_encrypted = saved.api_key_encrypted
        obj.extra_headers = saved.extra_headers
        obj.created_at, obj.updated_at = saved.created_at, saved.updated_at

    def delete_model(self, request: HttpRequest, obj: Upstream) -> None:
        upstream_delete(upstream=obj, **audit_context(request).service_kwargs())

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Upstream]) -> None:
        audit = audit_context(request).service_kwargs()
        for upstream in queryset:
            upstream_delete(upstream=upstream, **audit)

    # --- operator actions: on selected upstreams, and as the change page's buttons ----------------------------
    def _reset(self, request: HttpRequest, upstream: Upstream) -> None:
        reset = upstream_breakers_reset(upstream=upstream, **audit_context(request).service_kwargs())
        self.message_user(request, f"{upstream.name}: {reset.message}", messages.SUCCESS)

    def _test(self, request: HttpRequest, upstream: Upstream) -> None:
        _test_message(request, upstream_connection_test(upstream=upstream, **audit_context(request).service_kwargs()))

    def _back(self, request: HttpRequest, object_id: str) -> HttpResponse:
        url = reverse("admin:proxy_upstream_change", args=[object_id])
        if request.headers.get("HX-Request"):  # the dialog posts through htmx: it follows this header
            return HttpResponse(headers={"HX-Redirect": url})
        return HttpResponseRedirect(url)

    def _upstream(self, request: HttpRequest, object_id: str) -> Upstream | None:
        upstream = self.get_object(request, object_id)
        if upstream is None:
            self.message_user(request, f"No upstream with the id {object_id!r}.", messages.ERROR)
        return upstream

    @action(description="Reset circuit breakers", permissions=["change"])
    def reset_breakers(self, request: HttpRequest, queryset: QuerySet[Upstream]) -> None:
        for upstream in queryset:
            self._reset(request, upstream)

    @action(description="Test connection", permissions=["change"])
    def test_connection(self, request: HttpRequest, queryset: QuerySet[Upstream]) -> None:
        for upstream in queryset:
            self._test(request, upstream)

    @action(
        description="Reset circuit breakers",
        url_path="reset-breakers",
        permissions=["change"],
        icon="restart_alt",
        dialog=_RESET_DIALOG,
    )
    def reset_breakers_detail(self, request: HttpRequest, form: BaseDialogForm, object_id: str) -> HttpResponse:
        upstream = self._upstream(request, object_id)
        if upstream is None:
            return HttpResponseRedirect(reverse("admin:proxy_upstream_changelist"))
        self._reset(request, upstream)
        return self._back(request, object_id)

    @action(
        description="Test connection",
        url_path="test-connection",
        permissions=["change"],
        icon="network_check",
        dialog=_TEST_DIALOG,
    )
    def test_connection_detail(self, request: HttpRequest, form: BaseDialogForm, object_id: str) -> HttpResponse:
        upstream = self._upstream(request, object_id)
        if upstream is None:
            return HttpResponseRedirect(reverse("admin:proxy_upstream_changelist"))
        self._test(request, upstream)
        return self._back(request, object_id)


class DeploymentInlineFormSet(ServiceSavedInlineFormSet):
    """The inline rows as the service's ``DeploymentSpec``s, checked by the service's rules."""

    def deployment_specs(self) -> list[DeploymentSpec]:
        """The rows that stay (filled in and not marked for deletion), as the service wants them."""
        return [
            DeploymentSpec(
                upstream=form.cleaned_data["upstream"],
                upstream_model=form.cleaned_data["upstream_model"],
                weight=form.cleaned_data["weight"],
                is_active=form.cleaned_data["is_active"],
            )
            for form in self.forms
            if form.cleaned_data and not self._deleting(form)
        ]

    def clean(self) -> None:
        super().clean()
        if not any(form.errors for form in self.forms):
            errors = deployments_errors(self.deployment_specs())
            if errors:
                raise ValidationError(errors)


class DeploymentInline(TabularInline):
    model = Deployment
    formset = DeploymentInlineFormSet
    extra = 1
    min_num = 1
    fields = ["upstream", "upstream_model", "weight", "is_active"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Deployment]:
        return super().get_queryset(request).select_related("upstream", "model")

    def formfield_for_foreignkey(
        self, db_field: ForeignKey[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> ModelChoiceField[Any] | None:
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if field is not None and db_field.name == "upstream":
            # One query for the choices, not one per inline row.
            field.choices = list(cast(Iterable[tuple[Any, Any]], field.choices))
        return field


class FallbacksWidget(forms.MultiWidget):
    """One drop-down per place in the fallback order ("1st", "2nd", ...), each listing the other models."""

    template_name = "admin/proxy/model/fallbacks_widget.html"

    def __init__(self, slots: int, choices: list[tuple[str, str]]) -> None:
        super().__init__([UnfoldAdminSelectWidget(choices=choices) for _ in range(slots)])

    def decompress(self, value: Any) -> list[Any]:
        names = list(value) if isinstance(value, list | tuple) else []
        return [*names, *[None] * (len(self.widgets) - len(names))][: len(self.widgets)]


class FallbacksField(forms.MultiValueField):
    """Fallback model names in the order given: the places left empty are skipped, a model named twice is an
    error (the service's checks run afterwards all the same, in ``ModelAdminForm.clean``)."""

    def __init__(self, *, slots: int, choices: list[tuple[str, str]], **kwargs: Any) -> None:
        fields = [forms.ChoiceField(choices=choices, required=False) for _ in range(slots)]
        super().__init__(
            fields,
            require_all_fields=False,
            required=False,
            widget=FallbacksWidget(slots, choices),
            **kwargs,
        )

    def has_changed(self, initial: Any, data: Any) -> bool:
        # MultiValueField compares place by place with the initial list, which is shorter than the places.
        # Places missing from the request altogether (not a browser's form: it sends every one) change nothing.
        if self.disabled or (data and all(name is None for name in data)):
            return False
        return list(initial or []) != [name for name in data or [] if name]

    def compress(self, data_list: list[Any]) -> list[str]:
        names = [name for name in data_list or [] if name]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValidationError(f"Each fallback may be listed once: {', '.join(twice)} is listed more than once.")
        return names


# Empty places offered after the current fallbacks, so one more can be added without saving in between.
FALLBACK_SPARE_SLOTS = 3


class ModelAdminForm(forms.ModelForm):
    class Meta:
        model = Model
        fields = list(MODEL_FIELDS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "fallbacks" in self.fields:
            current = [name for name in (self.instance.fallbacks or []) if isinstance(name, str)]
            others = list(Model.objects.exclude(pk=self.instance.pk).order_by("name").values_list("name", flat=True))
            # A stored name no model has any more stays listed, so the service's check can name it.
            missing = [name for name in current if name not in others]
            choices = [("", "—"), *((name, name) for name in others), *((n, f"{n} (unknown)") for n in missing)]
            slots = min(len(others) + len(missing), len(current) + FALLBACK_SPARE_SLOTS)
            old = self.fields["fallbacks"]
            self.fields["fallbacks"] = FallbacksField(
                slots=slots,
                choices=choices,
                label=old.label,
                help_text="Tried in this order when every deployment of this model is refused or failing: pick a "
                "model per place (1st, 2nd, ...), leave the rest empty."
                + ("" if others else " No other model exists yet."),
            )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        candidate = construct_instance(self, copy.copy(self.instance), fields=list(MODEL_FIELDS))
        try:
            model_validate(model=candidate, model_checks=False)
        except ValidationError as exc:
            _errors_add(self, exc)
        return cleaned


@admin.register(Model)
class ModelAdmin(UnfoldModelAdmin):
    form = ModelAdminForm
    inlines = [DeploymentInline]
    list_display = ["name", "is_active", "input_price_per_1k", "output_price_per_1k", "deployment_count", "updated_at"]
    list_filter = ["is_active", "deployments__upstream"]
    search_fields = ["name", "deployments__upstream_model"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "is_active", "fallbacks"]}),
        ("Prices", {"fields": ["input_price_per_1k", "output_price_per_1k"]}),
        (
            "Limits",
            {
                "fields": ["rpm_limit", "tpm_limit", "output_tokens_estimate"],
                "description": "Caps that protect the upstream account's own quota: every key's calls to this model "
                "count together. Empty = no cap.",
            },
        ),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Model]:
        return model_list_for_admin()

    @admin.display(description="deployments", ordering="deployment_count")
    def deployment_count(self, obj: Model) -> int:
        return int(getattr(obj, "deployment_count", 0))

    def save_model(self, request: HttpRequest, obj: Model, form: forms.ModelForm, change: bool) -> None:
        # The model row goes through the services (validation, fallback renames, audit); its inline
        # deployments follow in save_related, through the service too, in the same transaction.
        fields = [name for name in MODEL_FIELDS if not change or name in form.changed_data]
        data: dict[str, Any] = {name: form.cleaned_data[name] for name in fields}
        audit = audit_context(request).service_kwargs()
        if change:
            saved = model_update(model=Model.objects.get(pk=obj.pk), data=data, **audit)  # type: ignore[arg-type]
        else:
            saved = model_create(data=data, deployments=[], **audit)  # type: ignore[arg-type]
        obj.pk = saved.pk
        obj.created_at, obj.updated_at = saved.created_at, saved.updated_at

    def save_related(self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool) -> None:
        # Instead of the formsets' own save(): the service validates, locks and invalidates the catalog.
        for formset in formsets:
            formset.history_note()
            if isinstance(formset, DeploymentInlineFormSet) and formset.has_changed():
                model_deployments_update(
                    model=form.instance,
                    deployments=formset.deployment_specs(),
                    **audit_context(request).service_kwargs(),
                )

    def delete_model(self, request: HttpRequest, obj: Model) -> None:
        model_delete(model=obj, **audit_context(request).service_kwargs())

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        audit = audit_context(request).service_kwargs()
        for model in queryset:
            model_delete(model=model, **audit)


import proxy.admin_playground  # noqa: E402, F401 - registers the playground page
import proxy.route_admin  # noqa: E402, F401 - registers the route admin (routes with inline targets)
