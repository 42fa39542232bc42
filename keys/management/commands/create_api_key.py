"""``manage.py create_api_key --user NAME --name NAME [--models ...] [--rpm N]``: issue a key, print its secret once.

The secret alone goes to stdout (``KEY=$(manage.py create_api_key ...)``); the summary goes to stderr.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.services import key_create


class Command(BaseCommand):
    help = "Issue an API key for a user and print its secret (shown once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="Username of the key's owner.")
        parser.add_argument("--name", required=True, help="A name for the key.")
        parser.add_argument("--models", nargs="*", default=[], help="Public model names it may call (default: all).")
        parser.add_argument("--rpm", type=int, default=None, help="Requests-per-minute limit (default: none).")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        try:
            owner = user_model.objects.get(username=options["user"])
        except user_model.DoesNotExist as exc:
            raise CommandError(f"No user named {options['user']!r}.") from exc
        try:
            issued = key_create(
                owner=owner, name=options["name"], allowed_models=options["models"], rpm_limit=options["rpm"]
            )
        except ValidationError as exc:
            raise CommandError("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in _errors(exc))) from exc
        self.stderr.write(
            f"Created API key {issued.key.prefix}… (id {issued.key.pk}) for {owner.get_username()}. "
            "The secret below is shown once; it cannot be shown again."
        )
        self.stdout.write(issued.secret)


def _errors(exc: ValidationError) -> list[tuple[str, list[str]]]:
    if hasattr(exc, "error_dict"):
        return [(field, [str(m) for e in errors for m in e.messages]) for field, errors in exc.error_dict.items()]
    return [("error", exc.messages)]
