"""``manage.py disable_api_key PREFIX``: disable the key with that prefix (it stops on every worker within ~1 s)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.models import ApiKey
from keys.services import key_disable


class Command(BaseCommand):
    help = "Disable the API key with the given prefix (as shown in lists, e.g. afk-AbCdEfGh)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="The key's prefix, as shown in lists.")

    def handle(self, *args: Any, **options: Any) -> None:
        prefix: str = options["prefix"].rstrip("…")
        keys = list(ApiKey.objects.filter(prefix=prefix)[:2])
        if not keys:
            raise CommandError(f"No API key has the prefix {prefix!r}.")
        if len(keys) > 1:
            raise CommandError(f"Several API keys have the prefix {prefix!r}; disable it in the admin instead.")
        key = key_disable(key=keys[0])
        self.stdout.write(f"Disabled API key {key.prefix}… ({key.name}, owner {key.owner_id}).")
