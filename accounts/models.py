"""The custom user model: Django's user with a unique email and an optional display name."""

from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.functions import Lower


class User(AbstractUser):
    email = models.EmailField("email address", unique=True)
    display_name = models.CharField(max_length=150, blank=True)

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
        ]

    def __str__(self) -> str:
        return self.display_name or self.username
