"""How long the admin dashboard takes on a big ledger: seed a throwaway PostgreSQL database with ``--rows``
ledger rows (1,000,000 by default) over the last ``--days`` days, roll them up the way production does
(``gateway_stats.rollups.usage_rollup``, the beat's run), add a raw tail of ``--tail`` calls made since that
rollup (what the selectors read raw between two beats), then time, for each period (hour, day, 30 days),
the dashboard callback alone and the whole ``/admin/`` page render (median of ``--runs`` runs each).
Target: under 200 ms.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/helper_c_bench .venv/bin/python bench/dashboard_bench.py

The database is created when missing and reseeded only when its ledger does not hold ``--rows`` + ``--tail``
rows (``--reseed`` forces it). Rows go in through the consumer's own insert (``ledger_write``, batches of
``--batch``). The calls look like a gateway's: ``--keys`` keys of very unequal traffic, a handful of models
each served by its own upstreams, one call in ten to a gateway route, some errors, latencies from 3 ms to
30 s. Prints a table and one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apiforge.settings")
os.environ.setdefault("APP_ENV", "development")
os.environ.setdefault("DEBUG", "false")  # DEBUG keeps every query in memory and times nothing real

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/helper_c_bench"
MODELS = {"gpt-4o": ("openai-a", "azure-a"), "gpt-4o-mini": ("openai-a",), "llama-70b": ("vllm-a", "vllm-b")}
MODELS_EXTRA = ("embed-small", "claude-3")
STATUSES = (200,) * 40 + (400, 401, 429, 429, 499, 500, 502, 504)
ROUTES = ("orders", "search", "billing")


def _database_create(url: str) -> None:
    """Create the database ``url`` names unless it exists (connected to the server's ``postgres`` database)."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            connection.execute(f'CREATE DATABASE "{name}"')


def _rows(count: int, *, start: float, span: float, keys: int, rng: random.Random) -> list[dict[str, Any]]:
    from gateway_stats.ledger import usage_row
    from gateway_stats.usage import UsageEvent

    models = [*MODELS, *MODELS_EXTRA]
    rows = []
    for _ in range(count):
        key = min(keys, int(rng.paretovariate(1.2)))  # a few keys make most of the calls
        route = rng.choice(ROUTES) if rng.random() < 0.1 else ""
        model = "" if route else rng.choice(models)
        status = rng.choice(STATUSES)
        event_id = uuid.uuid4().hex
        rows.append(
            usage_row(
                UsageEvent(
                    request_id=f"req-{event_id[:16]}",
                    endpoint=f"/gw/{route}" if route else "/v1/chat/completions",
                    status=status,
                    key_id=key,
                    key_prefix=f"afk-{key:06d}",
                    user_id=1 + key % 25,
                    model=model,
                    upstream=rng.choice(MODELS.get(model, ("other-a",))) if model else "",
                    upstream_model=model,
                    route=route,
                    prompt_tokens=0 if route else rng.randint(5, 3000),
                    completion_tokens=0 if route else rng.randint(0, 800),
                    latency_ms=10 ** rng.uniform(0.5, 4.5),
                    started_at=start + span * rng.random(),
                    error_code="" if status < 400 else f"e{status}",
                    input_price_per_1k=Decimal("0.0025"),
                    output_price_per_1k=Decimal("0.01"),
                    event_id=event_id,
                )
            )
        )
    return rows


def _seed(count: int, *, start: float, span: float, keys: int, batch: int, seed: int) -> float:
    """Write ``count`` calls of ``[start, start + span)`` through the ledger's insert; returns the seconds taken."""
    from gateway_stats.ledger import ledger_write

    rng = random.Random(seed)
    began = time.perf_counter()
    written = 0
    while written < count:
        size = min(batch, count - written)
        ledger_write(_rows(size, start=start, span=span, keys=keys, rng=rng))
        written += size
        if written % (batch * 10) == 0 or written == count:
            print(f"  seeded {written:,} rows ({time.perf_counter() - began:.0f} s)", flush=True)
    return time.perf_counter() - began


def _rollup_as_the_beat_did(end: datetime) -> tuple[int, float]:
    """Roll the ledger up as the beat would have while it filled: one ``usage_rollup`` run per window of
    ingestion time (``MAX_WINDOW``, each at its own "now"), until the watermark reaches ``end``."""
    from django.db.models import Min

    from gateway_stats.models import UsageRecord
    from gateway_stats.rollups import MAX_WINDOW, usage_rollup, usage_watermark

    logging.getLogger("gateway_stats.rollups").setLevel(logging.WARNING)  # one INFO line a run otherwise
    first = UsageRecord.objects.aggregate(first=Min("ingested_at"))["first"] or end
    began = time.perf_counter()
    runs = 0
    while (usage_watermark() or first) < end:
        usage_rollup(now=min(end, (usage_watermark() or first) + MAX_WINDOW))
        runs += 1
        if runs % 40 == 0:
            print(f"  {runs} rollup runs, watermark {usage_watermark():%Y-%m-%d %H:%M}", flush=True)
    return runs, time.perf_counter() - began


def _ledger_holds(rows: int, days: float) -> bool:
    from django.db.models import Count, Min

    from gateway_stats.models import UsageRecord

    found = UsageRecord.objects.aggregate(n=Count("id"), first=Min("started_at"))
    expected_first = datetime.now(UTC) - timedelta(days=days)
    return bool(found["n"] == rows and found["first"] and abs(found["first"] - expected_first) < timedelta(days=1))


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Migrate; reseed when the ledger does not hold what was asked. Returns what seeding and rolling up took.

    Each call is ingested two seconds after it ended (its ``ingested_at``), and the rollups run as the beat's
    did over that time, so buckets older than the raw retention were made while their rows were fresh, as in
    production (a single run now would leave them out: frozen buckets are never recomputed).
    """
    from django.core.management import call_command
    from django.db import connection

    from gateway_stats.models import UsageRollup

    call_command("migrate", interactive=False, verbosity=0)
    if not args.reseed and _ledger_holds(args.rows + args.tail, args.days):
        print("the ledger already holds these rows: reusing it (--reseed to start over)")
        return {"reused": True, "rollup_rows": UsageRollup.objects.count()}
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE gateway_stats_usagerecord, gateway_stats_usagerollup, gateway_stats_usagerollupstate,"
            " gateway_stats_usagelatencyrollup"
        )
    now = time.time()
    span = args.days * 86400.0
    print(f"seeding {args.rows:,} ledger rows over the last {args.days:g} days ...", flush=True)
    seed_s = _seed(args.rows, start=now - span, span=span - 120, keys=args.keys, batch=args.batch, seed=1)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE gateway_stats_usagerecord"
            " SET ingested_at = started_at + (latency_ms + 2000) * interval '1 millisecond'"
        )
        cursor.execute("ANALYZE gateway_stats_usagerecord")
    print("rolling up as the beat did (gateway_stats.rollups.usage_rollup) ...", flush=True)
    runs, rollup_s = _rollup_as_the_beat_did(datetime.now(UTC))
    print(f"  {runs} runs in {rollup_s:.0f} s")
    # The calls that arrived since the beat's last run: read raw by every statistic.
    _seed(args.tail, start=time.time() - 60, span=60, keys=args.keys, batch=args.batch, seed=2)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE gateway_stats_usagerecord")
        cursor.execute("ANALYZE gateway_stats_usagerollup")
    return {
        "reused": False,
        "seed_s": round(seed_s, 1),
        "rollup_runs": runs,
        "rollup_s": round(rollup_s, 1),
        "rollup_rows": UsageRollup.objects.count(),
    }


def _median_ms(work: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    work()  # warm: templates compiled, connection open, plans cached
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), times


def _measure(runs: int) -> list[dict[str, Any]]:
    from django.db import connection
    from django.test import Client, RequestFactory
    from django.test.utils import CaptureQueriesContext

    from accounts.models import User
    from apiforge.dashboard import dashboard_callback
    from gateway_stats.dashboard import PERIODS

    user, _ = User.objects.get_or_create(username="dashboard-bench", defaults={"is_staff": True, "is_superuser": True})
    client = Client()
    client.force_login(user)
    results = []
    for name in PERIODS:
        request = RequestFactory().get("/admin/", {"period": name})
        request.user = user

        def page(name: str = name) -> None:
            answer = client.get("/admin/", {"period": name})
            assert answer.status_code == 200, answer.status_code

        callback_ms, _ = _median_ms(lambda request=request: dashboard_callback(request, {}), runs)
        page_ms, page_times = _median_ms(page, runs)
        with CaptureQueriesContext(connection) as queries:
            page()
        results.append(
            {
                "period": name,
                "callback_ms": round(callback_ms, 1),
                "page_ms": round(page_ms, 1),
                "page_max_ms": round(max(page_times), 1),
                "queries": len(queries),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows rolled up (default 1,000,000)")
    parser.add_argument("--tail", type=int, default=1_000, help="rows written after the rollup (default 1,000)")
    parser.add_argument(
        "--days",
        type=float,
        default=56.0,
        help="spread over the last N days (default 56: both 30-day periods hold calls)",
    )
    parser.add_argument("--keys", type=int, default=500, help="API keys (default 500)")
    parser.add_argument("--batch", type=int, default=20_000, help="rows per ledger_write (default 20,000)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measure (default 7)")
    parser.add_argument("--reseed", action="store_true", help="seed again even if the ledger looks right")
    parser.add_argument("--target-ms", type=float, default=200.0, help="the page budget (default 200)")
    args = parser.parse_args()

    url = os.environ.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    if not url.startswith(("postgres://", "postgresql://")):
        parser.error("DATABASE_URL must name a throwaway PostgreSQL database")
    _database_create(url)

    import django

    django.setup()
    prepared = _prepare(args)
    results = _measure(args.runs)
    print(f"\n{'period':<8} {'callback ms':>12} {'page ms':>9} {'page max':>9} {'queries':>8}")
    for row in results:
        cells = (row["period"], row["callback_ms"], row["page_ms"], row["page_max_ms"], row["queries"])
        print("{:<8} {:>12} {:>9} {:>9} {:>8}".format(*cells))
    within = all(row["page_ms"] < args.target_ms for row in results)
    print(f"\nmedian page render {'within' if within else 'NOT within'} {args.target_ms:g} ms for every period")
    summary = {
        "rows": args.rows,
        "tail": args.tail,
        "days": args.days,
        "runs": args.runs,
        **prepared,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
        "within_target": within,
    }
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
