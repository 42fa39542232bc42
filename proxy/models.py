"""Upstreams (where calls go) and public models (what clients name), with their deployments."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models

from proxy.encryption import EncryptedJSONField, secret_decrypt, secret_encrypt


class Balancer(models.TextChoices):
    """How a model's deployments or a route's targets share the calls (``proxy.edge.balance``)."""

    ROUND_ROBIN = "round_robin", "Smooth weighted round-robin"
    LEAST_IN_FLIGHT = "least_in_flight", "Least in flight"
    EWMA = "ewma", "Latency-aware (EWMA)"


class Upstream(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible"
        MOCK = "mock", "Mock (answers locally)"

    name = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.OPENAI)
    base_url = models.URLField(max_length=500, blank=True, help_text="e.g. https://api.openai.com/v1")
    api_key_encrypted = models.TextField(blank=True, editable=False)
    timeout_s = models.FloatField(default=60.0, validators=[MinValueValidator(0.1)])
    max_retries = models.PositiveSmallIntegerField(default=2)
    # Header values are often credentials too: encrypted at rest like the API key.
    extra_headers = EncryptedJSONField(default=dict, blank=True)
    is_active = models.BooleanField(default=True)
    breaker_failure_threshold = models.PositiveIntegerField(default=5)
    breaker_cooldown_s = models.FloatField(default=30.0, validators=[MinValueValidator(0.0)])
    breaker_half_open_requests = models.PositiveSmallIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(kind="mock") | ~models.Q(base_url=""), name="upstream_openai_needs_base_url"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def api_key(self) -> str:
        return secret_decrypt(self.api_key_encrypted)

    @api_key.setter
    def api_key(self, value: str) -> None:
        self.api_key_encrypted = secret_encrypt(value)

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)


class Model(models.Model):
    """A public model name and how calls to it are served."""

    name = models.CharField(max_length=128, unique=True, help_text="What clients send as `model`.")
    is_active = models.BooleanField(default=True)
    balancer = models.CharField(max_length=16, choices=Balancer.choices, default=Balancer.ROUND_ROBIN)
    fallbacks = models.JSONField(default=list, blank=True, help_text="Ordered public model names tried next.")
    input_price_per_1k = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal("0"))]
    )
    output_price_per_1k = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal("0"))]
    )
    # Caps that protect the upstream account's own quota: every key's calls to this model count together.
    rpm_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Requests per minute to this model, across all keys; empty = none.",
    )
    tpm_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Tokens per minute to this model, across all keys; empty = none.",
    )
    output_tokens_estimate = models.PositiveIntegerField(
        default=256,
        validators=[MinValueValidator(1)],
        help_text="Completion tokens a call without max_tokens is assumed to use: what TPM limits and budgets "
        "reserve before the call (the real usage replaces it after).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(output_tokens_estimate__gte=1), name="model_output_tokens_estimate_positive"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Deployment(models.Model):
    """One way to serve a model: an upstream and the model name it knows."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="deployments")
    upstream = models.ForeignKey(Upstream, on_delete=models.PROTECT, related_name="deployments")
    upstream_model = models.CharField(max_length=128)
    weight = models.PositiveIntegerField(default=1)
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["model", "upstream", "upstream_model"], name="deployment_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.model.name} -> {self.upstream.name}:{self.upstream_model}"


class Route(models.Model):
    """A generic gateway route: requests under ``/gw/[{version}]{path}`` go to one of its targets.

    Configuration lives here; runtime state (breakers, active health) lives in ``proxy.edge.breaker`` and
    ``proxy.edge.health``. A route registered with ``ttl_s`` serves only while its lease
    (``lease_expires_at``) runs; an expired lease is deactivated (``deactivated_reason="lease_expired"``),
    never deleted, so operators see what disappeared.
    """

    class Auth(models.TextChoices):
        NONE = "none", "None (public)"
        KEY = "key", "API key"
        JWT = "jwt", "JWT access token"

    Balancer = Balancer

    name = models.SlugField(max_length=64, unique=True)
    path = models.CharField(max_length=200, help_text="Path prefix under /gw/, e.g. /orders.")
    version = models.CharField(max_length=32, blank=True, help_text="e.g. v2: served at /gw/v2/orders.")
    methods = models.JSONField(default=list, blank=True, help_text="HTTP methods; empty = all.")
    hosts = models.JSONField(default=list, blank=True, help_text="Host header values; empty = any.")
    auth = models.CharField(max_length=8, choices=Auth.choices, default=Auth.KEY)
    balancer = models.CharField(max_length=16, choices=Balancer.choices, default=Balancer.ROUND_ROBIN)
    strip_path = models.BooleanField(default=True, help_text="Drop the route's path prefix before forwarding.")
    # {"template": "/api/{path}"} or {"regex": "^/items/(\\d+)$", "replacement": "/item?id=\\1"}; {} = none.
    path_rewrite = models.JSONField(default=dict, blank=True)
    timeout_s = models.FloatField(default=30.0, validators=[MinValueValidator(0.1)])
    retries = models.PositiveSmallIntegerField(default=1)
    retry_non_idempotent = models.BooleanField(default=False)
    max_body_bytes = models.PositiveBigIntegerField(null=True, blank=True, help_text="Empty = no limit.")
    # {"add": {name: value}, "set": {name: value}, "remove": [name, ...]}
    request_headers = models.JSONField(default=dict, blank=True)
    response_headers = models.JSONField(default=dict, blank=True)
    # {"status": 200, "body": "...", "headers": {name: value}} served when no target can answer; {} = none.
    fallback = models.JSONField(default=dict, blank=True)
    deprecated = models.BooleanField(default=False)
    sunset_at = models.DateTimeField(null=True, blank=True)
    # {"path": "/healthz", "interval_s": 10, "timeout_s": 2, "healthy": 2, "unhealthy": 3}; {} = no active checks.
    health_check = models.JSONField(default=dict, blank=True)
    breaker_failure_threshold = models.PositiveIntegerField(default=5)
    breaker_cooldown_s = models.FloatField(default=30.0, validators=[MinValueValidator(0.0)])
    breaker_half_open_requests = models.PositiveSmallIntegerField(default=1)
    ttl_s = models.PositiveIntegerField(null=True, blank=True, help_text="Lease length; empty = no lease.")
    lease_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    rate_limit_rpm = models.PositiveIntegerField(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    deactivated_reason = models.CharField(max_length=32, blank=True, editable=False)
    # The key that registered (or last re-registered) the route, when it was not staff.
    registered_by_key_id = models.BigIntegerField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["is_active", "lease_expires_at"], name="route_lease_idx")]

    def __str__(self) -> str:
        return self.name


class RouteTarget(models.Model):
    """One backend of a route: a base URL and its weight; ``health`` is set by the health checker or an operator
    (``drained``: no new calls, e.g. before a deploy)."""

    class Health(models.TextChoices):
        HEALTHY = "healthy", "Healthy"
        UNHEALTHY = "unhealthy", "Unhealthy"
        DRAINED = "drained", "Drained"

    route = models.ForeignKey(Route, on_delete=models.CASCADE, related_name="targets")
    url = models.URLField(max_length=500)
    weight = models.PositiveIntegerField(default=1)
    health = models.CharField(max_length=16, choices=Health.choices, default=Health.HEALTHY)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["route", "url"], name="route_target_unique")]

    def __str__(self) -> str:
        return f"{self.route.name} -> {self.url}"
