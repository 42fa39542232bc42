"""``manage.py bootstrap_dev``: make a fresh development database usable (run by ``make run``).

Idempotent. Creates a superuser when none exists: credentials from
``DJANGO_SUPERUSER_USERNAME`` / ``DJANGO_SUPERUSER_PASSWORD`` /
``DJANGO_SUPERUSER_EMAIL``, else username ``admin`` with a generated password,
printed once (only when the user is created).
Refuses to run with ``APP_ENV=production`` unless ``--force``.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.services import superuser_ensure


class Command(BaseCommand):
    help = "Create a development superuser (once) and demo data. Refuses to run in production unless --force."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="Run even when APP_ENV=production.")

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.APP_ENV == "production" and not options["force"]:
            raise CommandError("APP_ENV=production: refusing to create development accounts (use --force to override).")

        username = os.environ.get("DJANGO_SUPERUSER_USERNAME") or "admin"
        email = os.environ.get("DJANGO_SUPERUSER_EMAIL") or f"{username}@example.com"
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD") or ""
        generated = not password
        if generated:
            password = secrets.token_urlsafe(16)

        try:
            user, created = superuser_ensure(username=username, email=email, password=password)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None

        if not created:
            self.stdout.write(f"Superuser exists: {user.username} (password unchanged).")
        elif generated:
            self.stdout.write(self.style.SUCCESS(f"Created superuser {user.username!r} with password: {password}"))
            self.stdout.write(
                "This password is shown only once; change it in /admin/ or with `manage.py changepassword`."
            )
        else:
            self.stdout.write(
                self.style.SUCCESS(f"Created superuser {user.username!r} (password from DJANGO_SUPERUSER_PASSWORD).")
            )
