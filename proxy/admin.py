"""Admin for upstreams and models (with inline deployments).

The upstream's API key is write-only here too: a password field that is never
rendered back, a checkbox to clear it, and the ciphertext is never shown. Extra
header values are shown masked; leaving the mask keeps the stored value. Every
write goes through ``proxy.services``, a model's inline deployments too
(``model_deployments_update``, right after the model, in the same transaction).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, cast

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import ForeignKey, QuerySet
from django.forms import ModelChoiceField
from django.forms.models import construct_instance
from django.http import HttpRequest
from unfold.admin import ModelAdmin as UnfoldModelAdmin
from unfold.admin import TabularInline

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


def _errors_add(form: forms.BaseForm, exc: ValidationError) -> None:
    """A service's field errors onto the form (fields that already failed keep only their own error)."""
    for field, messages in exc.message_dict.items():
        target = field if field in form.fields else None
        if target is not None and target not in form.cleaned_data:
            continue
        for message in messages:
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


@admin.register(Upstream)
class UpstreamAdmin(UnfoldModelAdmin):
    form = UpstreamAdminForm
    list_display = ["name", "kind", "base_url", "is_active", "has_key", "timeout_s", "max_retries", "updated_at"]
    list_filter = ["kind", "is_active"]
    search_fields = ["name", "base_url"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "base_url", "is_active"]}),
        ("Credentials", {"fields": ["api_key", "clear_api_key", "extra_headers"]}),
        ("Timeouts and retries", {"fields": ["timeout_s", "max_retries"]}),
        ("Circuit breaker", {"fields": ["breaker_failure_threshold", "breaker_cooldown_s"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    @admin.display(boolean=True, description="has key", ordering="api_key_encrypted")
    def has_key(self, obj: Upstream) -> bool:
        return obj.has_api_key

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


class ModelAdminForm(forms.ModelForm):
    class Meta:
        model = Model
        fields = list(MODEL_FIELDS)

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


import proxy.route_admin  # noqa: E402, F401 - registers the route admin (routes with inline targets)
