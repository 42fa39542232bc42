"""The custom user model: Django's user with a unique email, an optional display name and optional limits.

A user's limits (``rpm_limit``, ``budget_cost`` per ``budget_period``) are shared by all their API keys, so a
developer with many keys cannot multiply their quota; the proxy enforces them beside each key's own limits.
"""

from django.contrib.auth.models import AbstractUser
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models.functions import Lower


class BudgetPeriod(models.TextChoices):
    """When a budget starts again (``keys.periods``). The same keys as ``keys.models.ApiKey.BudgetPeriod``:
    spelled out here because accounts may not import keys (the "Accounts stand alone" contract)."""

    DAY = "day", "Day"
    MONTH = "month", "Month"
    TOTAL = "total", "Total"


class User(AbstractUser):
    BudgetPeriod = BudgetPeriod

    email = models.EmailField("email address", unique=True)
    display_name = models.CharField(max_length=150, blank=True)
    rpm_limit = models.PositiveIntegerField(
        "requests per minute",
        null=True,
        blank=True,
        help_text="Across all of this user's API keys together; empty = none.",
    )
    budget_cost = models.DecimalField(
        max_digits=20,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Cost per budget period, across all of this user's API keys together; empty = none.",
    )
    budget_period = models.CharField(
        max_length=8,
        choices=BudgetPeriod.choices,
        default=BudgetPeriod.MONTH,
        help_text="When the user's budget starts again: daily, monthly, or never (total).",
    )

    # Spelled out rather than inherited from AbstractUser.Meta, which django-stubs does not declare.
    class Meta:
        swappable = "AUTH_USER_MODEL"
        verbose_name = "user"
        verbose_name_plural = "users"
        ordering = ["id"]
        constraints = [
            # "Bob" and "bob" (or Bob@Example.com and bob@example.com) are one person.
            models.UniqueConstraint(
                Lower("username"),
                name="accounts_user_username_ci_unique",
                violation_error_message="A user with that username already exists.",
            ),
            models.UniqueConstraint(
                Lower("email"),
                name="accounts_user_email_ci_unique",
                violation_error_message="A user with that email address already exists.",
            ),
            models.CheckConstraint(
                condition=models.Q(budget_cost__gte=0), name="accounts_user_budget_cost_nonnegative"
            ),
            models.CheckConstraint(
                condition=models.Q(budget_period__in=["day", "month", "total"]),
                name="accounts_user_budget_period_valid",
            ),
        ]

    def __str__(self) -> str:
        return self.display_name or self.username
