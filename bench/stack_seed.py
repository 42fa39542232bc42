"""Prepare a throwaway database for ``bench/run.py``: migrate, then one upstream, one model, one gateway route
(``bench``, to the same upstream) and two API keys: one without limits and one with rpm, tpm and concurrency
limits set so high that they never trigger (``LIMITED``: what the limiter costs a limited key, in the
``limited`` modes).

Run with the project's virtualenv python and the same environment as the gateway
(``DATABASE_URL``, and above all ``SECRET_KEY``: key digests are peppered with
it, so a key made under another ``SECRET_KEY`` would be unknown to the server).
Prints one JSON line: ``{"api_key": ..., "limited_api_key": ..., "limits": {...}, "model": ...,
"upstream_model": ...}``.

It goes through the same services as the admin and the API, so the benchmark
sees exactly what a real deployment would store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apiforge.settings")

# The limited key's limits: checked on every call, never reached by a benchmark (10 million requests and 10
# billion tokens a minute, 100,000 in flight). tpm_limit is above PostgreSQL's integer range: SQLite only.
LIMITED = {"rpm_limit": 10_000_000, "tpm_limit": 10_000_000_000, "max_concurrency": 100_000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream-url", required=True, help="e.g. http://127.0.0.1:9100/v1")
    parser.add_argument("--model", default="bench-model", help="public model name")
    parser.add_argument("--upstream-model", default="gpt-x", help="model name sent to the upstream")
    args = parser.parse_args()

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)

    from accounts.models import User
    from keys.services import key_create
    from proxy.route_services import TargetSpec, route_register
    from proxy.services import DeploymentSpec, model_create, upstream_create

    user = User.objects.create_user(username="bench", email="bench@example.com", password=None)
    upstream = upstream_create(
        data={"name": "bench-upstream", "kind": "openai", "base_url": args.upstream_url, "timeout_s": 30.0}
    )
    model_create(
        data={"name": args.model},
        deployments=[DeploymentSpec(upstream=upstream, upstream_model=args.upstream_model)],
    )
    # The `gw` mode's generic route: /gw/bench/... -> the mock upstream's base URL, key auth, as an operator
    # would register it.
    route_register(data={"name": "bench", "path": "/bench", "auth": "key"}, targets=[TargetSpec(url=args.upstream_url)])
    issued = key_create(owner=user, name="bench")
    limited = key_create(
        owner=user,
        name="bench-limited",
        rpm_limit=LIMITED["rpm_limit"],
        tpm_limit=LIMITED["tpm_limit"],
        max_concurrency=LIMITED["max_concurrency"],
    )
    seed = {
        "api_key": issued.secret,
        "limited_api_key": limited.secret,
        "limits": LIMITED,
        "model": args.model,
        "upstream_model": args.upstream_model,
    }
    print(json.dumps(seed))


if __name__ == "__main__":
    main()
