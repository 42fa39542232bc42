"""``manage.py bootstrap_demo``: a ``demo`` model on a local mock upstream, and a demo API key.

Run by ``make run`` after ``bootstrap_dev``, so a fresh clone can call the proxy
at once. Idempotent: the upstream and model are created once; the key is
created (and its secret printed) only when the user has no key named ``demo``
yet, because a secret cannot be shown again. Refuses to run in production
unless ``--force``.
"""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.selectors import key_names_for_owner
from proxy.models import Model, Upstream
from proxy.services import DeploymentSpec, model_create, upstream_create

DEMO_MODEL = "demo"
DEMO_UPSTREAM = "demo-mock"
DEMO_KEY_NAME = "demo"


class Command(BaseCommand):
    help = "Create the demo model (mock upstream) and a demo API key for the development superuser."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", help="Owner of the demo key (default: the first superuser).")
        parser.add_argument("--force", action="store_true", help="Run even when APP_ENV=production.")

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.APP_ENV == "production" and not options["force"]:
            raise CommandError("bootstrap_demo is for development stacks; use --force to run it in production.")
        users = get_user_model().objects
        user = (
            users.filter(username=options["user"]).first()
            if options["user"]
            else users.filter(is_superuser=True).order_by("id").first()
        )
        if user is None:
            raise CommandError("No such user: create a superuser first (manage.py bootstrap_dev).")
        upstream = Upstream.objects.filter(name=DEMO_UPSTREAM).first() or upstream_create(
            data={"name": DEMO_UPSTREAM, "kind": Upstream.Kind.MOCK}
        )
        if not Model.objects.filter(name=DEMO_MODEL).exists():
            model_create(
                data={
                    "name": DEMO_MODEL,
                    "input_price_per_1k": Decimal("0.001"),
                    "output_price_per_1k": Decimal("0.002"),
                },
                deployments=[DeploymentSpec(upstream=upstream, upstream_model="demo-echo")],
            )
            self.stderr.write(f"Created the model {DEMO_MODEL!r} on the mock upstream {DEMO_UPSTREAM!r}.")
        username = user.get_username()
        if DEMO_KEY_NAME in key_names_for_owner(owner_id=user.pk):
            self.stderr.write(
                f"{username} already has a key named {DEMO_KEY_NAME!r}; its secret was printed when it was made. "
                f"For a new one: manage.py create_api_key --user {username} --name another-key"
            )
            return
        base_url = f"http://127.0.0.1:{os.environ.get('PORT') or '8000'}/v1"
        self.stderr.write(f"Demo API key (for OpenAI(base_url={base_url!r}, api_key=...)):")
        call_command("create_api_key", user=username, name=DEMO_KEY_NAME, models=[DEMO_MODEL], stdout=self.stdout)
