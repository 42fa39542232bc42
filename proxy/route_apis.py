"""The route registry's management API (the seed's paths, each also with/without a trailing slash):

- GET ``/api/routes`` (paginated; filters ``is_active``, ``auth``, ``version``, ``deprecated``; ``search`` on name),
- POST ``/api/register`` (201 created, 200 updated: registering the same name again is an update),
- DELETE ``/api/unregister`` (``{"name"}`` in the body, or ``?name=``),
- GET/PATCH/DELETE ``/api/routes/{id}/`` and POST ``/api/routes/{id}/heartbeat`` (renews the lease).

Writes: staff holding the ``proxy`` route permissions, or an API key (``Authorization: Bearer <key>`` or
``x-api-key``) whose ``allowed_routes`` names the route; ``proxy.route_services`` holds the rules (targets
allowlisted for keys, validation, leases, audit). Thin layer: serializers check shapes and refuse unknown
fields, the views call one service.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import django_filters
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
)
from rest_framework import exceptions, mixins, permissions, serializers, status, viewsets
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from apiforge.audit import audit_context
from apiforge.errors import ErrorResponseSerializer
from apiforge.permissions import ModelAction, staff_has_model_perm
from apiforge.serializers import StrictFieldsMixin
from keys.authentication import ApiKeyAuthentication
from keys.policy import KeyPolicy
from proxy.models import Route, RouteTarget
from proxy.route_selectors import (
    route_by_name,
    route_list,
    route_list_for_key,
    route_list_for_user,
    route_list_sees_all,
)
from proxy.route_services import (
    HTTP_METHODS,
    MAX_COOLDOWN_S,
    MAX_HALF_OPEN_REQUESTS,
    MAX_HOSTS,
    MAX_RETRIES_LIMIT,
    MAX_TARGETS,
    MAX_TIMEOUT_S,
    MAX_TTL_S,
    MIN_TTL_S,
    ROUTE_FIELDS,
    RouteFields,
    TargetSpec,
    route_delete,
    route_heartbeat,
    route_register,
    route_update,
)

_ERROR = OpenApiResponse(ErrorResponseSerializer, description="Validation errors, by field.")
_NOT_FOUND = OpenApiResponse(ErrorResponseSerializer, description="No such route (or not one you may see).")
_REFUSED = OpenApiResponse(
    ErrorResponseSerializer,
    description="Not allowed: a missing permission; or, for an API key, a route its allowed_routes does not "
    "name, a target outside ROUTE_TARGET_ALLOWLIST, or registration by key turned off.",
)


# --- JSON fields, documented by shape; ``proxy.route_services`` validates them ----------------------------

_HEADER_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


@extend_schema_field(
    {
        "type": "object",
        "properties": {
            "add": _HEADER_MAP,
            "set": _HEADER_MAP,
            "remove": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": False,
        "description": "Header transform: remove, then set (replace), then add. Names are HTTP tokens; values "
        "ISO-8859-1 text without line breaks. Credentials (Authorization, x-api-key, api-key), framing and "
        "hop-by-hop headers, and what the gateway sets itself (X-Forwarded-*, x-request-id, "
        "X-Authenticated-User*) are refused. {} = none.",
    }
)
class HeaderTransformField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "properties": {
            "template": {"type": "string", "description": "e.g. /api/{path}; {path} is the forwarded path."},
            "regex": {"type": "string", "description": "A regular expression matched against the forwarded path."},
            "replacement": {"type": "string", "description": r"Its replacement (\1 or \g<name> for groups)."},
        },
        "additionalProperties": False,
        "description": 'Either {"template": "/..."} or {"regex": "...", "replacement": "..."} (the regex must '
        "compile); {} = no rewrite.",
    }
)
class PathRewriteField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "properties": {
            "status": {"type": "integer", "minimum": 100, "maximum": 599},
            "body": {"description": "A string (sent as text/plain) or any JSON value (sent as application/json)."},
            "headers": _HEADER_MAP,
        },
        "additionalProperties": False,
        "description": "A static answer served when no target can answer; status is required when set. {} = none "
        "(the gateway answers 503 with Retry-After).",
    }
)
class FallbackField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Probed with GET on each target, e.g. /healthz."},
            "interval_s": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
            "timeout_s": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
            "healthy": {"type": "integer", "minimum": 1, "description": "Successes in a row that mark it healthy."},
            "unhealthy": {"type": "integer", "minimum": 1, "description": "Failures in a row that mark it unhealthy."},
        },
        "additionalProperties": False,
        "description": "Active health check of every target; path is required when set. {} = passive checks only.",
    }
)
class HealthCheckField(serializers.JSONField):
    pass


# --- serializers ------------------------------------------------------------------------------------------


class RouteTargetSerializer(serializers.ModelSerializer[RouteTarget]):
    class Meta:
        model = RouteTarget
        fields = ["id", "url", "weight", "health"]
        read_only_fields = fields
        extra_kwargs = {
            "health": {"help_text": "healthy, unhealthy (the health checks' word) or drained (no new calls)."}
        }


class RouteTargetWriteSerializer(StrictFieldsMixin, serializers.Serializer):
    url = serializers.CharField(
        max_length=500,
        help_text="The target's base URL: http or https, no user info, query or fragment (e.g. "
        "http://orders-1.internal:8080). A registration by API key must point at ROUTE_TARGET_ALLOWLIST.",
    )
    weight = serializers.IntegerField(
        min_value=0, max_value=1_000_000, default=1, help_text="Share of the calls; 0 = none."
    )
    health = serializers.ChoiceField(
        choices=RouteTarget.Health.choices,
        required=False,
        help_text="Leave out to keep a kept target's health (new targets start healthy); drained = no new calls.",
    )


@extend_schema_field(OpenApiTypes.BOOL)
class LeaseExpiredField(serializers.Field):
    """Whether the route's lease ran out (read from the whole route; optional in the schema, as internals are)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(source="*", required=False, **kwargs)

    def to_representation(self, value: Route) -> bool:
        return value.lease_expires_at is not None and value.lease_expires_at <= timezone.now()


class RouteSerializer(serializers.ModelSerializer[Route]):
    """A route as staff (and the key naming it) see it; other users get the fields that say how to call it.

    The internal fields are optional in the schema because answers to ordinary users leave them out.
    """

    # Shown to everyone who may see the route.
    PUBLIC_FIELDS = (
        "id",
        "name",
        "path",
        "version",
        "methods",
        "hosts",
        "auth",
        "timeout_s",
        "max_body_bytes",
        "deprecated",
        "sunset_at",
        "rate_limit_rpm",
        "is_active",
        "created_at",
        "updated_at",
    )

    methods = serializers.ListField(child=serializers.CharField(), read_only=True)
    hosts = serializers.ListField(child=serializers.CharField(), read_only=True)
    balancer = serializers.ChoiceField(choices=Route.Balancer.choices, required=False)
    strip_path = serializers.BooleanField(required=False)
    path_rewrite = PathRewriteField(required=False)
    retries = serializers.IntegerField(required=False)
    retry_non_idempotent = serializers.BooleanField(required=False)
    request_headers = HeaderTransformField(required=False)
    response_headers = HeaderTransformField(required=False)
    fallback = FallbackField(required=False)
    health_check = HealthCheckField(required=False)
    breaker_failure_threshold = serializers.IntegerField(required=False)
    breaker_cooldown_s = serializers.FloatField(required=False)
    breaker_half_open_requests = serializers.IntegerField(required=False)
    ttl_s = serializers.IntegerField(required=False, allow_null=True)
    lease_expires_at = serializers.DateTimeField(required=False, allow_null=True)
    lease_expired = LeaseExpiredField(
        help_text="The route has a lease and it ran out: it does not serve until renewed (heartbeat or register)."
    )
    deactivated_reason = serializers.CharField(
        required=False,
        help_text='Why an inactive route is: "lease_expired" (a heartbeat or re-register brings it back), '
        '"operator" (staff turned it off) or "key" (its own key did).',
    )
    targets = RouteTargetSerializer(many=True, required=False)

    class Meta:
        model = Route
        fields = [
            "id",
            *ROUTE_FIELDS,
            "lease_expires_at",
            "lease_expired",
            "deactivated_reason",
            "targets",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "name",
            "path",
            "version",
            "auth",
            "timeout_s",
            "max_body_bytes",
            "deprecated",
            "sunset_at",
            "rate_limit_rpm",
            "is_active",
            "created_at",
            "updated_at",
        ]

    def to_representation(self, instance: Route) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(instance)
        if not self.context.get("internals", False):
            return {name: value for name, value in data.items() if name in self.PUBLIC_FIELDS}
        return data


_REGISTER_HELP = (
    "Registering a name that exists updates that route (200): the body describes the whole route, so fields it "
    "leaves out take their defaults (is_active excepted: it stays as it is unless given), the targets are "
    "replaced as a set (a target whose URL stays keeps its id, health and breaker state), the lease (ttl_s) is "
    "renewed, and a route whose lease expired is active again (one an operator deactivated is not)."
)


@extend_schema_serializer(component_name="RouteDefinition")
class RouteWriteSerializer(StrictFieldsMixin, serializers.ModelSerializer[Route]):
    """A register body (a PATCH: the fields to change). The rules beyond shapes are ``route_validate``'s."""

    name = serializers.SlugField(max_length=64, help_text="Unique slug; what keys name in allowed_routes.")
    path = serializers.CharField(
        max_length=200,
        help_text="Path prefix under /gw/, e.g. /orders (a trailing slash is dropped). No “..”, “//”, “?”, “#”, "
        "whitespace or percent-escapes; it may not start with a platform path (/admin, /api, /auth, /v1, /gw, "
        "/health, /metrics, /docs, /redoc, /ws, /static), nor take another route's path + version + host.",
    )
    version = serializers.CharField(
        max_length=32, required=False, allow_blank=True, help_text="e.g. v2: served at /gw/v2{path}."
    )
    methods = serializers.ListField(
        child=serializers.ChoiceField(choices=HTTP_METHODS),
        max_length=len(HTTP_METHODS),
        required=False,
        help_text="Methods the route takes; empty = all (others answer 405).",
    )
    hosts = serializers.ListField(
        child=serializers.CharField(max_length=253),
        max_length=MAX_HOSTS,
        required=False,
        help_text="Host names (Host header, no port) the route answers for; empty = any.",
    )
    path_rewrite = PathRewriteField(required=False)
    request_headers = HeaderTransformField(required=False)
    response_headers = HeaderTransformField(required=False)
    fallback = FallbackField(required=False)
    health_check = HealthCheckField(required=False)
    targets = RouteTargetWriteSerializer(
        many=True,
        allow_empty=False,
        max_length=MAX_TARGETS,  # type: ignore[call-arg]  # ListSerializer takes it; the stubs do not say so
        help_text="The route's targets, replaced as a set when given (required to register).",
    )

    class Meta:
        model = Route
        fields = [
            *ROUTE_FIELDS,
            "targets",
        ]
        extra_kwargs = {
            "auth": {"help_text": "none (public), key (our API keys) or jwt (our access tokens)."},
            "timeout_s": {"min_value": 0.1, "max_value": MAX_TIMEOUT_S, "help_text": "Per attempt, in seconds."},
            "retries": {
                "min_value": 0,
                "max_value": MAX_RETRIES_LIMIT,
                "help_text": "Further attempts on other targets (idempotent methods only unless retry_non_idempotent).",
            },
            "max_body_bytes": {"min_value": 1, "help_text": "Largest request body; empty = no limit of its own."},
            "sunset_at": {"help_text": "Sent as the Sunset header; only meaningful with deprecated = true."},
            "deprecated": {"help_text": "Answers carry Deprecation (and Sunset, when sunset_at is set)."},
            "breaker_failure_threshold": {"min_value": 1, "max_value": 1_000_000},
            "breaker_cooldown_s": {"min_value": 0, "max_value": MAX_COOLDOWN_S},
            "breaker_half_open_requests": {"min_value": 1, "max_value": MAX_HALF_OPEN_REQUESTS},
            "ttl_s": {
                "min_value": MIN_TTL_S,
                "max_value": MAX_TTL_S,
                "help_text": "Lease length in seconds: the route stops serving unless renewed (heartbeat or "
                "register) within it. Empty = no lease.",
            },
            "rate_limit_rpm": {"min_value": 1, "help_text": "Requests per minute (stored; enforced by the limits)."},
            "is_active": {"help_text": "False takes the route out of service (kept, shown as inactive)."},
        }


class UnregisterSerializer(StrictFieldsMixin, serializers.Serializer):
    name = serializers.CharField(max_length=64, help_text="The route's name.")


def _target_specs(items: list[dict[str, Any]]) -> list[TargetSpec]:
    return [TargetSpec(url=item["url"], weight=item.get("weight", 1), health=item.get("health")) for item in items]


def _key(request: Request) -> KeyPolicy | None:
    return request.auth if isinstance(request.auth, KeyPolicy) else None


# --- who may ----------------------------------------------------------------------------------------------

# The model permission each write needs from staff (a register: add for a new name, change for an existing one).
_WRITE_ACTIONS: dict[str, tuple[ModelAction, ...]] = {
    "register": ("add", "change"),
    "partial_update": ("change",),
    "heartbeat": ("change",),
    "destroy": ("delete",),
    "unregister": ("delete",),
}


class RoutePermissions(permissions.BasePermission):
    """Reads: any authenticated caller (the queryset decides what they see). Writes: staff holding the route
    permission, or an API key (what it may touch is ``proxy.route_services``' to decide, and it finds only the
    routes it names)."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        if _key(request) is not None or request.method in permissions.SAFE_METHODS:
            return True
        actions = _WRITE_ACTIONS.get(getattr(view, "action", "") or "", ())
        return any(staff_has_model_perm(request.user, action, Route) for action in actions)


# --- views ------------------------------------------------------------------------------------------------


class RouteFilter(django_filters.FilterSet):
    class Meta:
        model = Route
        fields = ["is_active", "auth", "version", "deprecated"]


_READ = (
    "Staff holding `proxy.view_route` see every route; a request made with an API key sees the routes its "
    "`allowed_routes` names (active or not); other users see the active routes one of their keys may call, "
    "with only the fields that say how to call them."
)
_WHO_WRITES = (
    "Staff holding the `proxy` route permission, or an API key (`Authorization: Bearer <key>` or `x-api-key`) "
    "whose `allowed_routes` names this route explicitly."
)


@extend_schema(tags=["routes"])
class RouteViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Route]):
    """The gateway's route registry (see the module docstring)."""

    # Keys first: a Bearer value shaped like one of our keys is a key; any other Bearer value goes on to JWT.
    authentication_classes = [
        ApiKeyAuthentication,
        *cast("list[type[BaseAuthentication]]", api_settings.DEFAULT_AUTHENTICATION_CLASSES),  # classes at runtime
    ]
    permission_classes = [RoutePermissions]
    serializer_class = RouteSerializer
    filterset_class = RouteFilter
    search_fields = ["name"]
    ordering_fields = ["name", "path", "version", "created_at", "updated_at"]
    ordering = ["name"]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def _writing(self) -> bool:
        return self.request.method not in permissions.SAFE_METHODS

    def get_queryset(self) -> QuerySet[Route]:
        if getattr(self, "swagger_fake_view", False):
            return Route.objects.none()
        key = _key(self.request)
        if key is not None:
            return route_list_for_key(key=key)
        if self._writing():  # passed the permission check: staff holding the write's permission
            return route_list()
        return route_list_for_user(user=self.request.user)

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Route]]:
        if getattr(self, "action", None) in {"register", "partial_update"}:
            return RouteWriteSerializer
        return RouteSerializer

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        request = getattr(self, "request", None)
        context["internals"] = request is not None and (
            _key(request) is not None or self._writing() or route_list_sees_all(user=request.user)
        )
        return context

    def _answer(self, route: Route, status_code: int = status.HTTP_200_OK) -> Response:
        fresh = route_list().get(pk=route.pk)
        return Response(RouteSerializer(fresh, context=self.get_serializer_context()).data, status=status_code)

    @extend_schema(summary="List routes", description=_READ)
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="Read a route", description=_READ, responses={200: RouteSerializer, 404: _NOT_FOUND})
    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(
        summary="Register a route (create, or update the same name)",
        description=f"{_REGISTER_HELP}\n\nWho: {_WHO_WRITES} Staff need `proxy.add_route` for a new name and "
        "`proxy.change_route` for an existing one; a key's targets must match ROUTE_TARGET_ALLOWLIST.",
        request=RouteWriteSerializer,
        responses={
            201: OpenApiResponse(RouteSerializer, description="Created."),
            200: OpenApiResponse(RouteSerializer, description="Updated (the name was registered already)."),
            400: _ERROR,
            403: _REFUSED,
        },
    )
    def register(self, request: Request) -> Response:
        serializer = RouteWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        targets = _target_specs(data.pop("targets"))
        key = _key(request)
        if key is None:
            exists = Route.objects.filter(name=data["name"]).exists()
            if not staff_has_model_perm(request.user, "change" if exists else "add", Route):
                needed = "proxy.change_route" if exists else "proxy.add_route"
                raise exceptions.PermissionDenied(f"Registering this route needs the {needed} permission.")
        result = route_register(
            data=cast(RouteFields, data), targets=targets, key=key, **audit_context(request).service_kwargs()
        )
        return self._answer(result.route, status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)

    @extend_schema(
        summary="Change a route",
        description=f"The given fields only; `targets`, when given, replaces the targets as a set. Who: {_WHO_WRITES}",
        request=RouteWriteSerializer,
        responses={200: RouteSerializer, 400: _ERROR, 403: _REFUSED, 404: _NOT_FOUND},
    )
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        route = self.get_object()
        serializer = RouteWriteSerializer(route, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        items = data.pop("targets", None)
        updated = route_update(
            route=route,
            data=cast(RouteFields, data),
            targets=_target_specs(items) if items is not None else None,
            key=_key(request),
            **audit_context(request).service_kwargs(),
        )
        return self._answer(updated)

    @extend_schema(
        summary="Delete a route",
        description=f"Who: {_WHO_WRITES}",
        responses={204: OpenApiResponse(description="Deleted."), 403: _REFUSED, 404: _NOT_FOUND},
    )
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        route_delete(route=self.get_object(), key=_key(request), **audit_context(request).service_kwargs())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Unregister a route by name",
        description='The name comes in the JSON body (`{"name": "orders"}`) or as `?name=orders`. '
        f"Who: {_WHO_WRITES}",
        request=None,
        parameters=[
            OpenApiParameter(
                "name", OpenApiTypes.STR, required=False, description="The route's name (or give it in the body)."
            )
        ],
        responses={
            204: OpenApiResponse(description="Deleted."),
            400: _ERROR,
            403: _REFUSED,
            404: _NOT_FOUND,
        },
    )
    def unregister(self, request: Request) -> Response:
        body = request.data if isinstance(request.data, Mapping) else {}
        given = UnregisterSerializer(data=body) if body else None
        if given is not None:
            given.is_valid(raise_exception=True)
        from_body = given.validated_data["name"] if given is not None else None
        from_query = request.query_params.get("name") or None
        if from_body and from_query and from_body != from_query:
            raise serializers.ValidationError({"name": ["The body and ?name= name different routes."]})
        name = from_body or from_query
        if not name:
            raise serializers.ValidationError({"name": ["Give the route's name, in the body or as ?name=."]})
        key = _key(request)
        route = route_by_name(name=name, routes=route_list_for_key(key=key) if key is not None else route_list())
        if route is None:
            raise exceptions.NotFound(f"No route is called “{name}”.")
        route_delete(route=route, key=key, **audit_context(request).service_kwargs())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Renew a route's lease",
        description="lease_expires_at becomes now + ttl_s; a route deactivated because its lease ran out is active "
        "again (one an operator deactivated is not). A route without ttl_s has no lease: 400 on ttl_s. "
        f"Who: {_WHO_WRITES}",
        request=None,
        responses={200: RouteSerializer, 400: _ERROR, 403: _REFUSED, 404: _NOT_FOUND},
    )
    def heartbeat(self, request: Request, pk: str | None = None) -> Response:
        route = route_heartbeat(route=self.get_object(), key=_key(request), **audit_context(request).service_kwargs())
        return self._answer(route)

    def get_object(self) -> Route:
        # Not filtered by the list's query parameters: /api/routes/{id}/?is_active=false must not hide a route.
        route = get_object_or_404(self.get_queryset(), pk=self.kwargs["pk"])
        self.check_object_permissions(self.request, route)
        return route
