"""Management API of the proxy app: ``/api/upstreams/`` (staff) and ``/api/models/``.

Thin layer: serializers parse and render, the views call one service or selector.
The upstream API key is write-only (answers carry ``has_api_key``) and extra
header values are answered masked, because both may carry credentials.
"""

from __future__ import annotations

from typing import Any, cast

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_serializer, extend_schema_view
from rest_framework import permissions, serializers, viewsets

from apiforge.audit import audit_context
from apiforge.errors import ErrorResponseSerializer
from apiforge.permissions import ReadOrStaffModelPermissions, StaffModelPermissions
from proxy.models import Deployment, Model, Upstream
from proxy.selectors import model_list, model_list_for_user, model_list_sees_all, upstream_list
from proxy.services import (
    MAX_RETRIES_LIMIT,
    DeploymentSpec,
    ModelFields,
    extra_headers_masked,
    model_create,
    model_delete,
    model_update,
    upstream_create,
    upstream_delete,
    upstream_update,
)

_ERROR = OpenApiResponse(ErrorResponseSerializer, description="Validation errors, by field.")


# --- Upstreams ---------------------------------------------------------------


class ExtraHeadersField(serializers.DictField):
    """Header name -> value on write; answered as header name -> ``"***"``.

    Writing ``"***"`` as a value keeps that header's current value.
    """

    child = serializers.CharField(allow_blank=True, trim_whitespace=False)

    def to_representation(self, value: Any) -> dict[str, str]:
        return extra_headers_masked(value or {})


class UpstreamSerializer(serializers.ModelSerializer[Upstream]):
    api_key = serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        max_length=4096,
        style={"input_type": "password"},
        help_text="Write-only; stored encrypted. Omit to keep the current key, send an empty string to clear it.",
    )
    has_api_key = serializers.BooleanField(read_only=True, help_text="Whether an API key is stored.")
    extra_headers = ExtraHeadersField(
        required=False,
        help_text='Sent to the upstream with every call. Answers show the names with values masked as "***"; '
        'writing "***" keeps a header\'s current value. Authorization, Host, Content-Length and other '
        "headers the proxy sets are refused.",
    )

    class Meta:
        model = Upstream
        fields = [
            "id",
            "name",
            "kind",
            "base_url",
            "api_key",
            "has_api_key",
            "timeout_s",
            "max_retries",
            "extra_headers",
            "is_active",
            "breaker_failure_threshold",
            "breaker_cooldown_s",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "has_api_key", "created_at", "updated_at"]
        extra_kwargs = {
            "max_retries": {"min_value": 0, "max_value": MAX_RETRIES_LIMIT},
            "breaker_failure_threshold": {"min_value": 1},
            "base_url": {"help_text": "Required for kind `openai` (http or https), e.g. https://api.openai.com/v1."},
        }


@extend_schema_view(
    list=extend_schema(summary="List upstreams (staff)"),
    create=extend_schema(summary="Create an upstream (staff)", responses={201: UpstreamSerializer, 400: _ERROR}),
    retrieve=extend_schema(summary="Read an upstream (staff)"),
    partial_update=extend_schema(
        summary="Change an upstream (staff)", responses={200: UpstreamSerializer, 400: _ERROR}
    ),
    destroy=extend_schema(
        summary="Delete an upstream (staff)",
        responses={204: None, 409: OpenApiResponse(ErrorResponseSerializer, description="Still used by a deployment.")},
    ),
)
@extend_schema(tags=["upstreams"])
class UpstreamViewSet(viewsets.ModelViewSet[Upstream]):
    """Upstream servers the proxy forwards to: staff with ``proxy.view_upstream`` / ``add_`` / ``change_`` /
    ``delete_upstream`` (superusers hold all); ``is_staff`` alone is refused (403), as in the admin."""

    serializer_class = UpstreamSerializer
    permission_classes = [StaffModelPermissions]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    filterset_fields = ["kind", "is_active"]
    search_fields = ["name"]
    ordering_fields = ["name", "kind", "created_at", "updated_at"]

    def get_queryset(self) -> QuerySet[Upstream]:
        return upstream_list()

    def perform_create(self, serializer: serializers.BaseSerializer[Upstream]) -> None:
        serializer.instance = upstream_create(
            data=serializer.validated_data, **audit_context(self.request).service_kwargs()
        )

    def perform_update(self, serializer: serializers.BaseSerializer[Upstream]) -> None:
        serializer.instance = upstream_update(
            upstream=cast(Upstream, serializer.instance),
            data=serializer.validated_data,
            **audit_context(self.request).service_kwargs(),
        )

    def perform_destroy(self, instance: Upstream) -> None:
        upstream_delete(upstream=instance, **audit_context(self.request).service_kwargs())


# --- Models ------------------------------------------------------------------


class DeploymentSerializer(serializers.ModelSerializer[Deployment]):
    upstream = serializers.SlugRelatedField(
        slug_field="name", queryset=Upstream.objects.all(), help_text="The upstream's name."
    )

    class Meta:
        model = Deployment
        fields = ["id", "upstream", "upstream_model", "weight", "is_active"]
        read_only_fields = ["id"]


# PositiveIntegerField's range on PostgreSQL, checked on every database (SQLite's integers are wider).
_POSITIVE_INT_MAX = 2_147_483_647

_DEPLOYMENTS_HELP = (
    "Required on create. When written, replaces the model's deployments "
    "(one kept per upstream + upstream_model keeps its id). Shown to staff only."
)


@extend_schema_serializer(component_name="Model")  # the schema's names predate the class name
class PublicModelSerializer(serializers.ModelSerializer[Model]):
    """A public model as staff see it, deployments included."""

    fallbacks = serializers.ListField(
        child=serializers.CharField(max_length=128),
        required=False,
        help_text="Ordered names of other existing models tried when this one fails.",
    )
    deployments = DeploymentSerializer(
        many=True,
        required=False,  # required on create: validate(), and PublicModelCreateSerializer for the schema
        allow_empty=False,
        help_text=_DEPLOYMENTS_HELP,
    )

    class Meta:
        model = Model
        fields = [
            "id",
            "name",
            "is_active",
            "fallbacks",
            "input_price_per_1k",
            "output_price_per_1k",
            "rpm_limit",
            "tpm_limit",
            "output_tokens_estimate",
            "deployments",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "rpm_limit": {
                "min_value": 1,
                "max_value": _POSITIVE_INT_MAX,
                "help_text": "Requests per minute to this model across all keys (protects the upstream account's "
                "quota); null = none.",
            },
            "tpm_limit": {
                "min_value": 1,
                "max_value": _POSITIVE_INT_MAX,
                "help_text": "Tokens per minute to this model across all keys (protects the upstream account's "
                "quota); null = none.",
            },
            "output_tokens_estimate": {
                "min_value": 1,
                "max_value": _POSITIVE_INT_MAX,
                "help_text": "Completion tokens a call without `max_tokens` is assumed to use: what TPM limits and "
                "budgets reserve before the call; the real usage replaces it after. Default 256.",
            },
        }

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is None and not attrs.get("deployments"):
            raise serializers.ValidationError({"deployments": ["A model needs at least one deployment."]})
        if "deployments" in attrs and not attrs["deployments"]:
            raise serializers.ValidationError({"deployments": ["A model needs at least one deployment."]})
        return attrs


@extend_schema_serializer(component_name="Model")  # the create body stays "ModelRequest"
class PublicModelCreateSerializer(PublicModelSerializer):
    """The create body, for the schema: ``deployments`` is required there (``PublicModelSerializer.validate``)."""

    deployments = DeploymentSerializer(many=True, allow_empty=False, help_text=_DEPLOYMENTS_HELP)


class PublicModelSummarySerializer(serializers.ModelSerializer[Model]):
    """A public model as a non-staff user sees it: no upstream details."""

    class Meta:
        model = Model
        fields = ["id", "name", "is_active", "input_price_per_1k", "output_price_per_1k", "created_at", "updated_at"]
        read_only_fields = fields


def _deployment_specs(items: list[dict[str, Any]]) -> list[DeploymentSpec]:
    return [
        DeploymentSpec(
            upstream=item["upstream"],
            upstream_model=item["upstream_model"],
            weight=item.get("weight", 1),
            is_active=item.get("is_active", True),
        )
        for item in items
    ]


_MODELS_READ = (
    "Staff see every model with its deployments and fallbacks. Other users see the active models "
    "that one of their active API keys may call, without `deployments` and `fallbacks`."
)


@extend_schema_view(
    list=extend_schema(summary="List models", description=_MODELS_READ),
    retrieve=extend_schema(summary="Read a model", description=_MODELS_READ),
    create=extend_schema(
        summary="Create a model (staff)",
        request=PublicModelCreateSerializer,
        responses={201: PublicModelSerializer, 400: _ERROR},
    ),
    partial_update=extend_schema(summary="Change a model (staff)", responses={200: PublicModelSerializer, 400: _ERROR}),
    destroy=extend_schema(summary="Delete a model (staff); it is also dropped from other models' fallbacks"),
)
@extend_schema(tags=["models"])
class PublicModelViewSet(viewsets.ModelViewSet[Model]):
    """Public model names and the deployments that serve them."""

    # Reads: any authenticated user (the queryset decides what they see); writes: staff with
    # proxy.add_model / change_model / delete_model.
    permission_classes = [ReadOrStaffModelPermissions]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    filterset_fields = ["is_active"]
    search_fields = ["name"]
    ordering_fields = ["name", "created_at", "updated_at"]

    def _writing(self) -> bool:
        # A write has passed the permission check, so the writer holds the model permission it needs.
        return self.request.method not in permissions.SAFE_METHODS

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Model]]:
        # The schema documents the staff shape; answers to users who do not see every model are a subset of it.
        if getattr(self, "swagger_fake_view", False) or self._writing():
            return PublicModelSerializer
        return PublicModelSerializer if model_list_sees_all(user=self.request.user) else PublicModelSummarySerializer

    def get_queryset(self) -> QuerySet[Model]:
        if getattr(self, "swagger_fake_view", False):
            return Model.objects.none()
        if self._writing():  # e.g. a staff member holding change_model but not view_model still finds the model
            return model_list()
        return model_list_for_user(user=self.request.user)

    def _fresh(self, model: Model) -> Model:
        return model_list().get(pk=model.pk)

    def perform_create(self, serializer: serializers.BaseSerializer[Model]) -> None:
        data = dict(serializer.validated_data)
        deployments = _deployment_specs(data.pop("deployments"))
        model = model_create(
            data=cast(ModelFields, data),
            deployments=deployments,
            **audit_context(self.request).service_kwargs(),
        )
        serializer.instance = self._fresh(model)

    def perform_update(self, serializer: serializers.BaseSerializer[Model]) -> None:
        data = dict(serializer.validated_data)
        items = data.pop("deployments", None)
        model = model_update(
            model=cast(Model, serializer.instance),
            data=cast(ModelFields, data),
            deployments=_deployment_specs(items) if items is not None else None,
            **audit_context(self.request).service_kwargs(),
        )
        serializer.instance = self._fresh(model)

    def perform_destroy(self, instance: Model) -> None:
        model_delete(model=instance, **audit_context(self.request).service_kwargs())
