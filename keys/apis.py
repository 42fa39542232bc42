"""The keys management API: ``/api/keys/`` (list, create), ``/api/keys/{id}/`` (read, PATCH, DELETE = revoke),
``/api/keys/{id}/rotate/``. Serializers check shapes; the services own the rules and the writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import django_filters
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apiforge.audit import audit_context
from apiforge.filters import IdFilter
from apiforge.permissions import OwnerOrStaffModelPermissions
from apiforge.serializers import StrictFieldsMixin
from keys.models import ApiKey
from keys.selectors import BudgetSpent, key_budget_spent_many, key_list
from keys.services import ROTATION_GRACE_MAX_S, key_create, key_revoke, key_rotate, key_update
from keys.validators import MAX_LIST_ITEMS

if TYPE_CHECKING:
    from accounts.models import User


def _string_list(help_text: str, max_length: int) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(max_length=max_length),
        max_length=MAX_LIST_ITEMS,
        required=False,
        help_text=help_text,
    )


_COST_HELP = "A decimal string, to the ledger's precision (10 places)."


class BudgetSpentSerializer(serializers.Serializer):
    tokens = serializers.IntegerField(help_text="Total tokens of the key's calls in the current budget period.")
    cost = serializers.DecimalField(
        max_digits=30,
        decimal_places=10,
        help_text=f"Cost of the key's calls in the current budget period. {_COST_HELP}",
    )


class BudgetRemainingSerializer(serializers.Serializer):
    tokens = serializers.IntegerField(
        allow_null=True, help_text="`budget_tokens` minus the tokens spent, never below 0; null without a token budget."
    )
    cost = serializers.DecimalField(
        max_digits=30,
        decimal_places=10,
        allow_null=True,
        help_text=f"`budget_cost` minus the cost spent, never below 0; null without a cost budget. {_COST_HELP}",
    )


class ApiKeyListSerializer(serializers.ListSerializer):
    """A page of keys: their budget spend is read for the whole page in one query, not one per key."""

    def to_representation(self, data: Any) -> list[Any]:
        keys = list(data.all() if hasattr(data, "all") else data)
        self.context["budget_spent"] = key_budget_spent_many(keys)
        return super().to_representation(keys)


class ApiKeySerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """An API key as its owner sees it. The secret is never part of it (see ``key`` on create and rotate).

    ``budget_spent``, ``budget_remaining`` and ``budget_resets_at`` come from the usage ledger (the source of
    truth for spend): the key's calls since its current ``budget_period`` began (``BUDGET_TIMEZONE``).
    """

    allowed_models = _string_list("Public model names this key may call; empty = all. Each must exist.", 128)
    allowed_routes = _string_list(
        "Gateway route names this key may call; empty = all. Checked for format only until routes exist.", 128
    )
    ip_allowlist = _string_list(
        "IPv4/IPv6 addresses or CIDR networks (e.g. 10.0.0.0/8, 2001:db8::/32) the key may be used from; "
        "empty = any. Stored normalised (10.1.2.3/8 becomes 10.0.0.0/8).",
        64,
    )
    metadata = serializers.DictField(required=False, help_text="Free JSON object (up to 4 KB) for your own use.")
    budget_spent = serializers.SerializerMethodField(
        help_text="What the key's calls used in the current budget period, from the usage ledger."
    )
    budget_remaining = serializers.SerializerMethodField(
        help_text="What is left of `budget_tokens` and `budget_cost` in the current budget period."
    )
    budget_resets_at = serializers.SerializerMethodField(
        help_text="When the current budget period ends and the budget starts again (midnight or the first of "
        "the month in the server's BUDGET_TIMEZONE); null for `total`, which never resets."
    )

    class Meta:
        model = ApiKey
        list_serializer_class = ApiKeyListSerializer
        fields = [
            "id",
            "name",
            "prefix",
            "is_active",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
            "previous_valid_until",
            "allowed_models",
            "allowed_routes",
            "rpm_limit",
            "tpm_limit",
            "max_concurrency",
            "budget_tokens",
            "budget_cost",
            "budget_period",
            "budget_spent",
            "budget_remaining",
            "budget_resets_at",
            "ip_allowlist",
            "metadata",
            "owner",
        ]
        read_only_fields = ["id", "prefix", "created_at", "last_used_at", "revoked_at", "previous_valid_until", "owner"]
        extra_kwargs = {
            "prefix": {"help_text": "The first 12 characters of the secret, to tell keys apart."},
            "is_active": {
                "help_text": "False stops the key at once; true lets a disabled (not revoked) key work.",
                # The browsable API's form starts with an active key: a key made by filling only the name works.
                "initial": True,
            },
            "budget_period": {"initial": "month"},  # the model's default, so the pre-filled form can be sent as is
            "expires_at": {"help_text": "After this instant the key is refused; must be in the future when set."},
            "last_used_at": {"help_text": "When the key was last used (to within a minute or so)."},
            "revoked_at": {
                "help_text": "When the key was revoked (DELETE). Revoked keys stay listed, with is_active false, "
                "so their history stays visible; list with ?revoked=false to hide them."
            },
            "previous_valid_until": {
                "help_text": "After a rotation with grace_seconds > 0: until when the previous secret still works."
            },
            "owner": {"help_text": "Id of the user the key belongs to (the requesting user on create)."},
            "rpm_limit": {"min_value": 0},
            "tpm_limit": {"min_value": 0},
            "max_concurrency": {"min_value": 0},
            "budget_tokens": {"min_value": 0},
            "budget_cost": {"min_value": 0},
        }

    def to_representation(self, instance: ApiKey) -> Any:
        page: dict[int, BudgetSpent] | None = self.context.get("budget_spent")
        spent = page.get(instance.pk) if page is not None else None
        self._spent = spent if spent is not None else key_budget_spent_many([instance])[instance.pk]
        return super().to_representation(instance)

    @extend_schema_field(BudgetSpentSerializer)
    def get_budget_spent(self, obj: ApiKey) -> dict[str, Any]:
        return {"tokens": self._spent.tokens, "cost": _decimal(self._spent.cost)}

    @extend_schema_field(BudgetRemainingSerializer)
    def get_budget_remaining(self, obj: ApiKey) -> dict[str, Any]:
        return {"tokens": self._spent.remaining_tokens, "cost": _decimal(self._spent.remaining_cost)}

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_budget_resets_at(self, obj: ApiKey) -> str | None:
        resets_at = self._spent.resets_at
        return None if resets_at is None else serializers.DateTimeField().to_representation(resets_at)


def _decimal(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


class ApiKeyIssuedSerializer(ApiKeySerializer):
    """A key with its secret: only in the answers to create and rotate."""

    key = serializers.SerializerMethodField(help_text="The full secret. Shown once: store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]

    @extend_schema_field(OpenApiTypes.STR)
    def get_key(self, obj: ApiKey) -> str:
        secret: str = self.context["secret"]
        return secret


class KeyRotateSerializer(StrictFieldsMixin, serializers.Serializer):
    grace_seconds = serializers.IntegerField(
        min_value=0,
        max_value=ROTATION_GRACE_MAX_S,
        default=0,
        help_text="How long the previous secret keeps working, in seconds (0 = it stops at once).",
    )


class ApiKeyFilter(django_filters.FilterSet):
    # A number, not a choice of users: the browsable API would otherwise list every user in a select box.
    owner = IdFilter(field_name="owner_id", label="Owner (user id; staff)")
    revoked = django_filters.BooleanFilter(
        field_name="revoked_at", lookup_expr="isnull", exclude=True, label="Revoked keys only (true) or none (false)"
    )

    class Meta:
        model = ApiKey
        fields = ["is_active", "owner", "revoked"]


@contextmanager
def _as_api_errors() -> Iterator[None]:
    """A service's ``django.core.exceptions.ValidationError`` answers 400 with field errors."""
    try:
        yield
    except DjangoValidationError as exc:
        raise serializers.ValidationError(serializers.as_serializer_error(exc)) from exc


def _user(request: Request) -> User:
    return cast("User", request.user)  # every view here requires an authenticated user


@extend_schema(tags=["keys"])
@extend_schema_view(
    list=extend_schema(
        summary="List API keys",
        description="Your keys; staff holding `keys.view_apikey` see every key and may filter by owner.",
    ),
    retrieve=extend_schema(summary="Read an API key"),
    create=extend_schema(
        summary="Issue an API key",
        request=ApiKeySerializer,
        responses={201: ApiKeyIssuedSerializer},
        description="The answer holds the secret as `key`, the only time it is ever shown.",
    ),
    partial_update=extend_schema(summary="Change an API key", request=ApiKeySerializer, responses=ApiKeySerializer),
    destroy=extend_schema(
        summary="Revoke an API key",
        description="The key stops working at once, for good. The record and its usage history stay.",
        responses={204: OpenApiResponse(description="Revoked.")},
    ),
)
class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    # Owners manage their keys with no model permission; other users' keys need staff with keys.view_apikey
    # to be seen (else 404), change_apikey to PATCH or rotate, delete_apikey to revoke (else 403).
    permission_classes = [OwnerOrStaffModelPermissions]
    serializer_class = ApiKeySerializer
    filterset_class = ApiKeyFilter
    search_fields = ["name", "prefix"]
    ordering_fields = ["created_at", "last_used_at", "name"]
    ordering = ["-created_at", "-id"]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return ApiKey.objects.none()
        return key_list(actor=_user(self.request))  # another user's key is simply not found: 404

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with _as_api_errors():
            issued = key_create(
                owner=_user(request), **audit_context(request).service_kwargs(), **serializer.validated_data
            )
        data = ApiKeyIssuedSerializer(issued.key, context={"secret": issued.secret}).data
        return Response(data, status=status.HTTP_201_CREATED)

    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = self.get_object()
        serializer = self.get_serializer(key, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        with _as_api_errors():
            key = key_update(
                key=key,
                changes=serializer.validated_data,
                **audit_context(request).service_kwargs(),
            )
        return Response(self.get_serializer(key).data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        key_revoke(key=self.get_object(), **audit_context(request).service_kwargs())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Rotate an API key's secret",
        request=KeyRotateSerializer,
        responses={200: ApiKeyIssuedSerializer},
        description="A new secret for the same key (limits, scopes and history stay), returned once as `key`. "
        "The previous secret keeps working for `grace_seconds`.",
    )
    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, pk: str | None = None) -> Response:
        key = self.get_object()
        serializer = KeyRotateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with _as_api_errors():
            issued = key_rotate(
                key=key,
                grace_seconds=serializer.validated_data["grace_seconds"],
                **audit_context(request).service_kwargs(),
            )
        return Response(ApiKeyIssuedSerializer(issued.key, context={"secret": issued.secret}).data)
