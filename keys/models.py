"""API keys: the stored form of a key (digests only), its scopes, limits and budgets."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models

from keys.validators import validate_allowed_models, validate_allowed_routes, validate_ip_allowlist, validate_metadata


class ApiKey(models.Model):
    """One API key. The secret itself is never stored: ``digest`` is its HMAC-SHA256 under the pepper.

    After a rotation with a grace period, ``previous_digest`` keeps the old secret
    working until ``previous_valid_until``. A revoked key (``revoked_at`` set) is
    never active again; the row stays so usage history keeps its key.
    """

    class BudgetPeriod(models.TextChoices):
        DAY = "day", "Day"
        MONTH = "month", "Month"
        TOTAL = "total", "Total"

    # PROTECT: a user's keys must be revoked and deleted deliberately before the user can go.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, db_index=True, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    previous_digest = models.CharField(max_length=64, unique=True, null=True, blank=True, editable=False)
    previous_valid_until = models.DateTimeField(null=True, blank=True, editable=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    allowed_models = models.JSONField(
        default=list, blank=True, validators=[validate_allowed_models], help_text="Public model names; empty = all."
    )
    allowed_routes = models.JSONField(
        default=list, blank=True, validators=[validate_allowed_routes], help_text="Route names; empty = all."
    )
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty = none.")
    tpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute; empty = none.")
    max_concurrency = models.PositiveIntegerField(null=True, blank=True, help_text="Requests in flight; empty = none.")
    budget_tokens = models.PositiveBigIntegerField(null=True, blank=True, help_text="Tokens per budget period.")
    budget_cost = models.DecimalField(
        max_digits=14,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Cost per budget period.",
    )
    budget_period = models.CharField(max_length=8, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH)
    ip_allowlist = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_ip_allowlist],
        help_text="IPv4/IPv6 addresses or CIDR networks the key may be used from; empty = any.",
    )
    metadata = models.JSONField(default=dict, blank=True, validators=[validate_metadata])

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API key"
        indexes = [models.Index(fields=["owner", "-created_at"], name="apikey_owner_created")]
        constraints = [
            models.CheckConstraint(condition=models.Q(budget_cost__gte=0), name="apikey_budget_cost_nonnegative"),
            models.CheckConstraint(
                condition=models.Q(budget_period__in=["day", "month", "total"]), name="apikey_budget_period_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(revoked_at__isnull=True) | models.Q(is_active=False), name="apikey_revoked_inactive"
            ),
            models.CheckConstraint(
                condition=models.Q(previous_digest__isnull=True, previous_valid_until__isnull=True)
                | models.Q(previous_digest__isnull=False, previous_valid_until__isnull=False),
                name="apikey_previous_digest_has_deadline",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None
