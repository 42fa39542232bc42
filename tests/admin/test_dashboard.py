"""The admin index as the gateway's dashboard: the period's cards equal ``/api/stats/summary`` and compare with
the previous period, the charts' data is in the page, every deployment's and route target's health and breaker
are listed, an empty ledger says so, the query count does not grow with the ledger, and only staff get in."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from accounts.models import User
from gateway_stats.ledger import ledger_write, usage_row
from gateway_stats.metrics import ingestion_lag_observe
from gateway_stats.rollups import usage_rollup
from gateway_stats.transport import ledger_transport
from gateway_stats.usage import UsageEvent
from proxy.edge.breaker import BreakerPolicy, breaker_failure, health_note
from proxy.models import Deployment, Model, Route, RouteTarget, Upstream
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

INDEX = "/admin/"
MODELS = ("gpt-4o", "gpt-4o-mini", "embed-small")
CARDS = ("requests", "error_rate", "tokens", "cost", "latency_p95")
CHARTS = ("requests", "latency", "tokens-by-model", "cost-by-model")


def _ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def calls(
    count: int,
    *,
    start: datetime,
    span: timedelta,
    seed: int = 3,
    statuses: tuple[int, ...] = (200, 200, 200, 429, 502),
    keys: tuple[int, ...] = (11, 12, 21),
) -> None:
    """``count`` calls spread over ``[start, start + span)``, written in one batch as the consumer writes them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        key = rng.choice(keys)
        status = rng.choice(statuses)
        rows.append(
            usage_row(
                UsageEvent(
                    request_id=f"req-{uuid.uuid4().hex[:12]}",
                    endpoint="/v1/chat/completions",
                    status=status,
                    key_id=key,
                    key_prefix=f"afk-{key:06d}",
                    user_id=key // 10,
                    model=rng.choice(MODELS),
                    upstream="openai-a",
                    upstream_model="m",
                    prompt_tokens=rng.randint(0, 900),
                    completion_tokens=rng.randint(0, 300),
                    latency_ms=10 ** rng.uniform(0.5, 3.5),
                    started_at=(start + span * rng.random()).timestamp(),
                    error_code="" if status < 400 else f"e{status}",
                    input_price_per_1k=Decimal("0.0025"),
                    output_price_per_1k=Decimal("0.01"),
                    event_id=uuid.uuid4().hex,
                )
            )
        )
    ledger_write(rows)


class _Elements(HTMLParser):
    """The attributes of every element with an id, and of every ``tr`` with a ``data-member``."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.members: dict[str, dict[str, str]] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "id" in values:
            self.by_id[values["id"]] = values
        if "data-member" in values:
            self.members[values["data-member"]] = values


def _page(client: Client, query: str = "") -> tuple[str, _Elements]:
    answer = client.get(INDEX + query)
    assert answer.status_code == 200, answer.content[:2000]
    html = answer.content.decode()
    return html, _Elements(html)


def _summary(user: User, start: str, end: str) -> dict[str, Any]:
    api = APIClient()
    api.force_authenticate(user)
    answer = api.get("/api/stats/summary", {"start": start, "end": end})
    assert answer.status_code == 200, answer.content
    return dict(answer.json()["totals"])


def _card(elements: _Elements, name: str) -> str:
    return elements.by_id[f"card-{name}"]["data-value"]


def _chart(elements: _Elements, name: str) -> dict[str, Any]:
    canvas = elements.by_id[f"chart-{name}"]
    assert "chart" in canvas["class"].split()  # drawn by Unfold's chart script
    return dict(json.loads(canvas["data-value"]))


@pytest.mark.parametrize("period", ["hour", "day", "30d"])
def test_the_cards_show_what_the_summary_api_answers_for_the_same_range(admin_for, root, period):
    calls(40, start=_ago(days=20), span=timedelta(days=19), seed=1)
    calls(30, start=_ago(hours=20), span=timedelta(hours=19), seed=2)
    usage_rollup()  # the older calls from the rollups, the newer from the raw tail, as in production
    calls(50, start=_ago(minutes=50), span=timedelta(minutes=40), seed=3)

    _, elements = _page(admin_for(root), f"?period={period}")
    root_div = elements.by_id["dashboard"]
    totals = _summary(root, root_div["data-start"], root_div["data-end"])

    assert root_div["data-period"] == period
    assert int(_card(elements, "requests")) == totals["requests"] > 0
    assert int(_card(elements, "tokens")) == totals["total_tokens"]
    assert Decimal(_card(elements, "cost")) == Decimal(totals["cost"])
    assert float(_card(elements, "error_rate")) == pytest.approx(totals["errors"] / totals["requests"])
    assert float(_card(elements, "latency_p95")) == pytest.approx(totals["latency_p95_ms"])


def test_each_card_says_how_it_changed_against_the_previous_period(admin_for, root):
    calls(10, start=_ago(minutes=50), span=timedelta(minutes=30), statuses=(200, 502), seed=4)
    calls(5, start=_ago(minutes=110), span=timedelta(minutes=40), statuses=(200,), seed=5)

    html, elements = _page(admin_for(root), "?period=hour")

    assert "+100% vs previous hour" in html  # 10 requests against 5
    assert elements.by_id["card-requests"]["data-trend"] == "up"
    rate = float(_card(elements, "error_rate"))
    assert f"{rate * 100:+.1f} pts vs previous hour" in html  # against no error at all
    assert elements.by_id["card-error_rate"]["data-trend"] == "up"
    assert elements.by_id["card-error_rate"]["data-tone"] == "bad"
    assert elements.by_id["card-requests"]["data-tone"] == "neutral"


def test_a_period_without_a_previous_one_says_so(admin_for, root):
    calls(3, start=_ago(minutes=20), span=timedelta(minutes=10))

    html, _ = _page(admin_for(root), "?period=hour")

    assert "none in the previous hour" in html


def test_a_quiet_period_after_a_busy_one_says_so(admin_for, root):
    calls(4, start=_ago(minutes=100), span=timedelta(minutes=20))

    html, elements = _page(admin_for(root), "?period=hour")

    assert "dashboard-empty" in elements.by_id  # nothing in this hour
    assert "-100% vs previous hour" in html  # requests: 0 against 4
    assert "no calls in this hour, some in the previous one" in html  # error rate and p95: none to compare


def test_the_charts_data_is_in_the_page_for_unfolds_chart_script(admin_for, root):
    calls(60, start=_ago(hours=10), span=timedelta(hours=9), seed=6)

    html, elements = _page(admin_for(root), "?period=day")

    requests = _chart(elements, "requests")
    assert len(requests["labels"]) in (24, 25)  # every hour of the day, with or without calls
    assert [dataset["label"] for dataset in requests["datasets"]] == ["Requests", "Errors"]
    assert sum(requests["datasets"][0]["data"]) == 60
    latency = _chart(elements, "latency")
    assert [dataset["label"] for dataset in latency["datasets"]] == ["p50", "p95", "p99"]
    assert any(value is not None for value in latency["datasets"][1]["data"])
    tokens = _chart(elements, "tokens-by-model")
    assert sorted(tokens["labels"]) == sorted(MODELS)
    cost = _chart(elements, "cost-by-model")
    assert sum(cost["datasets"][0]["data"]) == pytest.approx(float(_card(elements, "cost")))
    assert "unfold/js/chart/chart.js" in html  # the bundled Chart.js, no CDN
    assert "afk-000011" in html  # top keys by spend


def test_calls_with_neither_tokens_nor_cost_draw_no_empty_bar_by_model(admin_for, root):
    calls(20, start=_ago(hours=3), span=timedelta(hours=2), seed=8)
    refused = UsageEvent(
        request_id="req-refused",
        endpoint="/v1/chat/completions",
        status=404,
        error_code="model_not_found",
        started_at=_ago(hours=1).timestamp(),
        event_id=uuid.uuid4().hex,
    )
    ledger_write([usage_row(refused)])

    _, elements = _page(admin_for(root), "?period=day")

    assert _card(elements, "requests") == "21"  # the refused call counts as a request
    assert sorted(_chart(elements, "tokens-by-model")["labels"]) == sorted(MODELS)  # but is no "(no model)" bar
    assert sorted(_chart(elements, "cost-by-model")["labels"]) == sorted(MODELS)


def test_every_deployment_and_route_target_is_listed_with_its_health_and_breaker(admin_for, root):
    upstream = Upstream.objects.create(name="openai-a", kind="mock")
    model = Model.objects.create(name="gpt-4o")
    broken = Deployment.objects.create(model=model, upstream=upstream, upstream_model="gpt-4o-2024")
    fine = Deployment.objects.create(model=model, upstream=upstream, upstream_model="gpt-4o-mini")
    route = Route.objects.create(name="orders", path="/orders")
    sick = RouteTarget.objects.create(route=route, url="http://127.0.0.1:9/a")
    drained = RouteTarget.objects.create(route=route, url="http://127.0.0.1:9/b", health="drained")
    breaker_failure(f"dep:{broken.pk}", BreakerPolicy(failure_threshold=1, cooldown_s=60))
    health_note(f"rt:{sick.pk}", False)

    html, elements = _page(admin_for(root))

    members = elements.members
    assert members[f"dep:{broken.pk}"]["data-breaker"] == "open"
    assert members[f"dep:{fine.pk}"]["data-breaker"] == "closed"
    assert members[f"rt:{sick.pk}"]["data-health"] == "unhealthy"
    assert members[f"rt:{drained.pk}"]["data-health"] == "unknown"
    assert "3 of 4 need attention" in html
    assert "probe in 60 s" in html or "probe in 59 s" in html
    assert f'href="/admin/proxy/route/{route.pk}/change/"' in html


def test_an_empty_ledger_says_there_is_no_traffic_yet(admin_for, root):
    html, elements = _page(admin_for(root))

    assert "dashboard-empty" in elements.by_id
    assert "No traffic yet in the last day" in html
    assert not [name for name in elements.by_id if name.startswith("chart-")]
    assert _card(elements, "requests") == "0"
    assert _card(elements, "latency_p95") == ""
    assert "No model deployment or route target is configured yet." in html
    assert "no batch committed yet" in html


def test_the_ingestion_lag_and_the_spool_are_shown(admin_for, root):
    ingestion_lag_observe(1.25)
    ledger_transport.spool.append([{"event_id": "spooled"}])

    html, elements = _page(admin_for(root))

    assert float(elements.by_id["ingestion-lag"]["data-lag"]) == 1.25
    assert "1.25 s" in html
    assert int(elements.by_id["ingestion-spool"]["data-spool"]) > 0


def test_an_unknown_period_shows_the_default_day(admin_for, root):
    _, elements = _page(admin_for(root), "?period=fortnight")

    assert elements.by_id["dashboard"]["data-period"] == "day"


def test_staff_without_the_ledger_permission_see_their_own_keys_calls_only(admin_for):
    own = UserFactory(username="ops", staff=True)
    own.user_permissions.set(Permission.objects.filter(codename="view_apikey"))
    calls(8, start=_ago(hours=2), span=timedelta(hours=1), keys=(own.pk * 10,), seed=7)
    calls(5, start=_ago(hours=2), span=timedelta(hours=1), keys=((own.pk + 1) * 10,), seed=8)

    html, elements = _page(admin_for(own))

    assert _card(elements, "requests") == "8"
    assert "the calls of your own keys only" in html


def _render_queries(client: Client) -> int:
    with CaptureQueriesContext(connection) as queries:
        _page(client)
    return len(queries)


def test_the_query_count_stays_flat_as_the_ledger_and_the_members_grow(admin_for, root):
    upstream = Upstream.objects.create(name="openai-a", kind="mock")
    model = Model.objects.create(name="gpt-4o")
    route = Route.objects.create(name="orders", path="/orders")

    def grow(number: int) -> None:
        Deployment.objects.create(model=model, upstream=upstream, upstream_model=f"m{number}")
        RouteTarget.objects.create(route=route, url=f"http://127.0.0.1:9/{number}")

    client = admin_for(root)
    grow(0)
    calls(10, start=_ago(hours=20), span=timedelta(hours=19), seed=9)
    few = _render_queries(client)
    for number in range(1, 6):
        grow(number)
    calls(990, start=_ago(hours=20), span=timedelta(hours=19), keys=tuple(range(100, 400)), seed=10)
    many = _render_queries(client)

    assert many == few


@pytest.mark.parametrize("staff", [False, None])
def test_anyone_but_staff_is_sent_to_the_login_page(admin_for, staff):
    client = Client() if staff is None else admin_for(UserFactory(username="dev"))

    answer = client.get(INDEX)

    assert answer.status_code == 302
    assert answer["Location"] == "/admin/login/?next=/admin/"


def test_a_small_cost_reads_as_what_it_is_not_as_zero(admin_for, root):
    row = usage_row(
        UsageEvent(
            request_id="tiny",
            endpoint="/v1/chat/completions",
            status=200,
            key_id=11,
            key_prefix="afk-tiny",
            model="demo",
            prompt_tokens=1,
            completion_tokens=2,
            latency_ms=1.0,
            started_at=_ago(minutes=5).timestamp(),
            input_price_per_1k=Decimal("0.002"),
            output_price_per_1k=Decimal("0.002"),
            event_id=uuid.uuid4().hex,
        )
    )
    ledger_write([row])
    html, elements = _page(admin_for(root), "?period=hour")
    assert Decimal(_card(elements, "cost")) == Decimal("0.000006")
    assert html.count(">0.000006<") == 1  # the key's row in the top keys
    assert "0.000006" in html.split('id="card-cost"', 1)[1].split("</div>", 1)[0]
