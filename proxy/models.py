"""Upstreams (where calls go) and public models (what clients name), with their deployments."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models

from proxy.encryption import EncryptedJSONField, secret_decrypt, secret_encrypt


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
    fallbacks = models.JSONField(default=list, blank=True, help_text="Ordered public model names tried next.")
    input_price_per_1k = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal("0"))]
    )
    output_price_per_1k = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal("0"))]
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

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
