"""The upstream and model pages as the operators' control room: the upstream's last day from the request log and
its deployments' breakers now (on the change page and as changelist columns, in a flat number of queries), the
audited "Reset circuit breakers" and "Test connection" actions (bulk and as the change page's buttons, staff
with the change permission only), and a model's fallbacks picked in order from the other models."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any, cast

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from gateway_stats.ledger import ledger_write, usage_row
from gateway_stats.models import AuditEvent, UsageRollup
from gateway_stats.rollups import usage_rollup
from gateway_stats.usage import UsageEvent
from proxy.edge.breaker import BreakerPolicy, breaker_failure, breaker_view, deployment_key
from proxy.models import Deployment, Model, Upstream
from tests.factories import UserFactory
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import model_make, upstream_make

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/proxy/upstream/"
UPSTREAM_KEY = "sk-upstream-" + uuid.uuid4().hex  # the upstream's own key: must never show in a page or a log


def _change(upstream: Upstream) -> str:
    return f"{CHANGELIST}{upstream.pk}/change/"


def _calls(
    count: int,
    *,
    upstream: str,
    model: str = "gpt-a",
    status: int = 200,
    latency_ms: float = 100.0,
    error_code: str = "",
    ago: timedelta = timedelta(hours=1),
) -> None:
    """``count`` calls in the request log, written as the usage consumer writes them."""
    started = (datetime.now(UTC) - ago).timestamp()
    ledger_write(
        [
            usage_row(
                UsageEvent(
                    request_id=f"req-{uuid.uuid4().hex[:12]}",
                    endpoint="/v1/chat/completions",
                    status=status,
                    model=model,
                    upstream=upstream,
                    upstream_model="m" if upstream else "",
                    latency_ms=latency_ms,
                    started_at=started,
                    error_code=error_code,
                    event_id=uuid.uuid4().hex,
                )
            )
            for _ in range(count)
        ]
    )


def _trip(deployment: Deployment) -> None:
    """Open ``deployment``'s breaker as a failing call does (threshold 1, the upstream's cooldown)."""
    policy = BreakerPolicy(failure_threshold=1, cooldown_s=deployment.upstream.breaker_cooldown_s)
    breaker_failure(deployment_key(deployment.pk), policy)
    assert breaker_view(deployment_key(deployment.pk)).state == "open"


def _messages(answer: Any) -> list[tuple[str, str]]:
    return [(message.level_tag, message.message) for message in get_messages(answer.wsgi_request)]


class _Page(HTMLParser):
    """The attributes of every element with an id or a ``data-deployment``, and the form's fields as a browser
    would submit them (inputs, checked boxes, selected options, text areas)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.deployments: dict[str, dict[str, str]] = {}
        self.fields: dict[str, str] = {}
        self._select: str | None = None
        self._textarea: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "id" in values:
            self.by_id[values["id"]] = values
        if "data-deployment" in values:
            self.deployments[values["data-deployment"]] = values
        name = values.get("name")
        if tag == "input" and name and values.get("type") not in {"submit", "button", "file"}:
            if values.get("type") in {"checkbox", "radio"}:
                if "checked" in values:
                    self.fields[name] = values.get("value", "on")
            else:
                self.fields[name] = values.get("value", "")
        elif tag == "select" and name:
            self._select = name
            self.fields.setdefault(name, "")
        elif tag == "option" and self._select and "selected" in values:
            self.fields[self._select] = values.get("value", "")
        elif tag == "textarea" and name:
            self._textarea = name
            self.fields[name] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.fields[self._textarea] += data.removeprefix("\n") if not self.fields[self._textarea] else data


def _page(client: Client, url: str) -> tuple[str, _Page]:
    answer = client.get(url)
    assert answer.status_code == 200, answer.content[:2000]
    html = answer.content.decode()
    return html, _Page(html)


@pytest.fixture
def root_client(admin_for: Callable[[User], Client], root: User) -> Client:
    return admin_for(root)


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def upstream() -> Upstream:
    return upstream_make(name="openai-a", base_url="http://127.0.0.1:9/v1", api_key=UPSTREAM_KEY)


# --- the change page's panel and the changelist's columns ------------------------------------------------


def test_the_change_page_shows_the_upstreams_last_day_and_its_deployments_now(root_client, upstream):
    first = Deployment.objects.get(model=model_make("gpt-a", upstream, upstream_model="a-1"))
    second = Deployment.objects.get(model=model_make("gpt-b", upstream, upstream_model="b-1"))
    _calls(6, upstream="openai-a", latency_ms=100.0)
    _calls(2, upstream="openai-a", status=502, latency_ms=900.0, error_code="upstream_error")
    _calls(2, upstream="openai-a", status=429, latency_ms=5.0, error_code="rate_limited")
    _calls(3, upstream="another", latency_ms=50.0)  # another upstream's
    _calls(4, upstream="openai-a", ago=timedelta(hours=30))  # older than the window
    # Refused with every breaker open: the proxy names no upstream on these rows, only the model.
    _calls(5, upstream="", model="gpt-a", status=503, error_code="no_healthy_upstream")
    before = datetime.now(UTC).replace(microsecond=0)
    _trip(first)

    html, page = _page(root_client, _change(upstream))

    assert page.by_id["ops-calls"]["data-value"] == "10"
    assert page.by_id["ops-error-rate"]["data-value"] == "4"
    assert page.by_id["ops-error-rate-5xx"]["data-value"] == "2"
    assert "40.0%" in html  # 4 errors of 10 calls
    assert "20.0%" in html  # 2 of them 5xx
    # Percentiles of the log's latency histogram (buckets a few percent wide): 6 of 10 calls took 100 ms, 2 900 ms.
    assert 90 <= float(page.by_id["ops-p50"]["data-value"]) <= 110
    assert 800 <= float(page.by_id["ops-p95"]["data-value"]) <= 1000
    opened = page.deployments[deployment_key(first.pk)]
    closed = page.deployments[deployment_key(second.pk)]
    assert (opened["data-breaker"], opened["data-health"], opened["data-refused"]) == ("open", "unknown", "5")
    assert (closed["data-breaker"], closed["data-refused"]) == ("closed", "0")
    assert "trip 1 in a row" in html
    tripped_at = datetime.fromisoformat(opened["data-opened-at"])
    assert before <= tripped_at <= datetime.now(UTC)
    assert closed["data-opened-at"] == ""  # a closed breaker keeps no trip time
    assert UPSTREAM_KEY not in html


def test_the_panel_says_so_when_the_upstream_had_no_calls(root_client, upstream):
    html, page = _page(root_client, _change(upstream))

    assert page.by_id["ops-calls"]["data-value"] == "0"
    assert "No model is deployed on this upstream yet." in html


def test_the_changelist_shows_calls_errors_and_breakers_per_upstream(root_client, upstream):
    deployment = Deployment.objects.get(model=model_make("gpt-a", upstream))
    model_make("gpt-b", upstream)
    quiet = upstream_make(name="quiet", base_url="http://127.0.0.1:9/v1")
    model_make("gpt-q", quiet)
    _calls(3, upstream="openai-a", ago=timedelta(hours=3))
    usage_rollup()  # those from the rollups, the next from the raw tail, as in production
    assert UsageRollup.objects.filter(upstream="openai-a").exists()
    _calls(1, upstream="openai-a", status=500)
    _trip(deployment)

    html = root_client.get(CHANGELIST).content.decode()

    columns = ("calls_24h", "errors_24h", "breakers")
    assert [_cell(html, "openai-a", column) for column in columns] == ["4", "25.0%", "1 open"]
    assert [_cell(html, "quiet", column) for column in columns] == ["0", "–", "all closed"]
    assert _cell(html, "openai-a", "p95_24h").endswith(" ms")


def _cell(html: str, name: str, column: str) -> str:
    """The text of ``column`` in the changelist row of the upstream ``name``."""
    start = html.index(f">{name}</a>")
    row = html[start : html.index("</tr>", start)]
    found = re.search(rf'<td class="field-{column}[^"]*"[^>]*>(.*?)</td>', row, re.S)
    assert found is not None, row
    return re.sub(r"<[^>]+>", "", found[1]).strip()


@pytest.mark.parametrize("url", ["changelist", "change"])
def test_the_pages_query_count_does_not_grow_with_the_request_log(root_client, upstream, url):
    for index in range(5):
        model_make(f"gpt-{index}", upstream)
    target = CHANGELIST if url == "changelist" else _change(upstream)

    def queries(rows: int) -> int:
        _calls(rows, upstream="openai-a", latency_ms=float(rows))
        _calls(rows, upstream="", model="gpt-1", status=503, error_code="no_healthy_upstream")
        root_client.get(target)  # warm: the session, the content types
        with CaptureQueriesContext(connection) as captured:
            assert root_client.get(target).status_code == 200
        return len(captured.captured_queries)

    assert queries(10) == queries(100)


# --- Reset circuit breakers ------------------------------------------------------------------------------


def test_reset_on_selected_upstreams_closes_their_open_breakers_and_is_audited(root_client, root, upstream):
    deployments = [Deployment.objects.get(model=model_make(name, upstream)) for name in ("gpt-a", "gpt-b")]
    _trip(deployments[0])

    answer = root_client.post(CHANGELIST, {"action": "reset_breakers", "_selected_action": [upstream.pk]}, follow=True)

    assert answer.status_code == 200
    assert [breaker_view(deployment_key(d.pk)).state for d in deployments] == ["closed", "closed"]
    assert ("success", "openai-a: 2 breaker(s) reset, 1 of them open or half-open before.") in _messages(answer)
    event = AuditEvent.objects.get(action="upstream.breaker_reset")
    assert (event.actor, event.object_type, event.object_id, event.changes["not_closed"]) == (
        root,
        "proxy.upstream",
        str(upstream.pk),
        [deployment_key(deployments[0].pk)],
    )


def test_the_change_pages_reset_button_asks_first_then_closes_the_breakers(root_client, upstream):
    deployment = Deployment.objects.get(model=model_make("gpt-a", upstream))
    _trip(deployment)
    url = f"{CHANGELIST}{upstream.pk}/reset-breakers/"
    _, page = _page(root_client, _change(upstream))
    assert any(values.get("href") == url for values in _links(root_client, _change(upstream)))

    asked = root_client.get(url)  # the confirmation dialog: nothing is reset by a GET
    assert asked.status_code == 200
    assert "Reset the circuit breakers" in asked.content.decode()
    assert breaker_view(deployment_key(deployment.pk)).state == "open"

    answer = root_client.post(url, {"_form_submitted": "on"}, headers={"HX-Request": "true"})

    assert answer.status_code == 200
    assert answer.headers["HX-Redirect"] == _change(upstream)
    assert breaker_view(deployment_key(deployment.pk)).state == "closed"
    assert AuditEvent.objects.filter(action="upstream.breaker_reset", object_id=str(upstream.pk)).count() == 1
    plain = root_client.post(url, {"_form_submitted": "on"})  # without htmx: an ordinary redirect
    assert (plain.status_code, plain.headers["Location"]) == (302, _change(upstream))


class _Links(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.links: list[dict[str, str]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.append({name: value or "" for name, value in attrs})


def _links(client: Client, url: str) -> list[dict[str, str]]:
    return _Links(client.get(url).content.decode()).links


# --- Test connection -------------------------------------------------------------------------------------


def test_test_connection_shows_the_status_and_time_of_the_upstreams_models_answer(root_client, root, fake):
    upstream = upstream_make(name="fake", base_url=fake.base_url, api_key=UPSTREAM_KEY, timeout_s=60)
    url = f"{CHANGELIST}{upstream.pk}/test-connection/"
    assert any(values.get("href") == url for values in _links(root_client, _change(upstream)))

    asked = root_client.get(url)  # the confirmation dialog: nothing is called by a GET
    assert "Test the connection" in asked.content.decode()
    assert fake.requests_to("/v1/models") == []

    answer = root_client.post(url, {"_form_submitted": "on"}, follow=True)

    assert answer.status_code == 200
    [(level, text)] = _messages(answer)
    assert level == "success"
    assert text.startswith(f"fake: GET {fake.base_url}/models answered 200 in ")
    assert text.endswith(" ms.")
    request = fake.last_request
    assert (request.method, request.path) == ("GET", "/v1/models")
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the key as the proxy sends it
    assert UPSTREAM_KEY not in answer.content.decode()
    event = AuditEvent.objects.get(action="upstream.test_connection")
    assert (event.actor, event.changes["status"]) == (root, 200)
    assert UPSTREAM_KEY not in str(event.changes)


def test_a_non_2xx_answer_is_a_warning(root_client, fake):
    upstream = upstream_make(name="fake", base_url=fake.base_url, api_key=UPSTREAM_KEY)
    fake.fail_next(1, status=401)

    answer = root_client.post(CHANGELIST, {"action": "test_connection", "_selected_action": [upstream.pk]}, follow=True)

    [(level, text)] = _messages(answer)
    assert level == "warning"
    assert "answered 401 (not a 2xx)" in text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_test_connection_to_a_closed_port_is_a_clear_error_not_a_500(root_client):
    upstream = upstream_make(name="down", base_url=f"http://127.0.0.1:{_closed_port()}/v1", api_key=UPSTREAM_KEY)

    answer = root_client.post(f"{CHANGELIST}{upstream.pk}/test-connection/", {"_form_submitted": "on"}, follow=True)

    assert answer.status_code == 200
    [(level, text)] = _messages(answer)
    assert level == "error"
    assert "failed: could not connect" in text
    assert UPSTREAM_KEY not in text
    assert AuditEvent.objects.get(action="upstream.test_connection").changes["status"] is None


def test_a_mock_upstream_has_nothing_to_call_and_is_not_tested(root_client):
    mock = upstream_make(name="local", kind="mock")

    answer = root_client.post(CHANGELIST, {"action": "test_connection", "_selected_action": [mock.pk]}, follow=True)

    assert _messages(answer) == [("warning", "local: not tested, a mock upstream answers locally.")]


# --- who may run them ------------------------------------------------------------------------------------


def test_a_non_staff_user_can_run_neither_action(admin_for, upstream, fake):
    deployment = Deployment.objects.get(model=model_make("gpt-a", upstream))
    _trip(deployment)
    probe = upstream_make(name="fake", base_url=fake.base_url)
    client = admin_for(UserFactory())

    answers = [
        client.post(f"{CHANGELIST}{upstream.pk}/reset-breakers/", {"_form_submitted": "on"}),
        client.post(f"{CHANGELIST}{probe.pk}/test-connection/", {"_form_submitted": "on"}),
        client.post(CHANGELIST, {"action": "reset_breakers", "_selected_action": [upstream.pk]}),
    ]

    assert [answer.status_code for answer in answers] == [302, 302, 302]  # to the login page
    assert all("/admin/login/" in answer.headers["Location"] for answer in answers)
    assert breaker_view(deployment_key(deployment.pk)).state == "open"
    assert fake.requests_to("/v1/models") == []
    assert not AuditEvent.objects.filter(action__startswith="upstream.").exists()


def test_staff_who_may_only_view_upstreams_cannot_run_them(admin_for, upstream):
    deployment = Deployment.objects.get(model=model_make("gpt-a", upstream))
    _trip(deployment)
    viewer = cast(User, UserFactory(staff=True))
    viewer.user_permissions.add(Permission.objects.get(codename="view_upstream"))
    client = admin_for(viewer)

    page = client.get(_change(upstream)).content.decode()
    refused = client.post(f"{CHANGELIST}{upstream.pk}/reset-breakers/", {"_form_submitted": "on"})
    bulk = client.post(CHANGELIST, {"action": "reset_breakers", "_selected_action": [upstream.pk]})

    assert "reset-breakers/" not in page
    assert "An API key is stored." in page  # the state, not the key (the secret-leak check would see it)
    assert refused.status_code == 403
    assert bulk.status_code in {200, 302}  # Django answers an unknown action with the list again
    assert breaker_view(deployment_key(deployment.pk)).state == "open"
    assert not AuditEvent.objects.filter(action__startswith="upstream.").exists()


# --- a model's fallbacks ---------------------------------------------------------------------------------


def _model_form(client: Client, model: Model) -> dict[str, str]:
    _, page = _page(client, f"/admin/proxy/model/{model.pk}/change/")
    return page.fields


def test_the_fallbacks_are_picked_from_the_other_models_and_saved_in_the_order_given(root_client, upstream):
    model = model_make("gpt-main", upstream)
    for name in ("gpt-b", "gpt-c", "gpt-d"):
        model_make(name, upstream)
    html, _ = _page(root_client, f"/admin/proxy/model/{model.pk}/change/")
    assert 'name="fallbacks_0"' in html
    assert '<option value="gpt-main"' not in html  # not its own fallback
    data = _model_form(root_client, model)
    data.update({"fallbacks_0": "gpt-d", "fallbacks_1": "", "fallbacks_2": "gpt-b"})

    answer = root_client.post(f"/admin/proxy/model/{model.pk}/change/", data)

    assert answer.status_code == 302, answer.context["adminform"].form.errors
    model.refresh_from_db()
    assert model.fallbacks == ["gpt-d", "gpt-b"]
    # Shown again in that order, so saving unchanged keeps it.
    again = _model_form(root_client, model)
    assert (again["fallbacks_0"], again["fallbacks_1"], again["fallbacks_2"]) == ("gpt-d", "gpt-b", "")
    assert root_client.post(f"/admin/proxy/model/{model.pk}/change/", again).status_code == 302
    model.refresh_from_db()
    assert model.fallbacks == ["gpt-d", "gpt-b"]


@pytest.mark.parametrize(
    ("picked", "error"),
    [
        (("gpt-nope", ""), "Select a valid choice. gpt-nope is not one of the available choices."),
        (("gpt-b", "gpt-b"), "Each fallback may be listed once: gpt-b is listed more than once."),
    ],
)
def test_an_unknown_or_repeated_fallback_is_refused_with_a_clear_error(root_client, upstream, picked, error):
    model = model_make("gpt-main", upstream, fallbacks=[])
    model_make("gpt-b", upstream)
    model_make("gpt-c", upstream)
    data = _model_form(root_client, model)
    data.update({"fallbacks_0": picked[0], "fallbacks_1": picked[1]})

    answer = root_client.post(f"/admin/proxy/model/{model.pk}/change/", data)

    assert answer.status_code == 200
    assert error in answer.content.decode()
    model.refresh_from_db()
    assert model.fallbacks == []


def test_a_stored_fallback_whose_model_is_gone_is_named_by_the_services_check(root_client, upstream):
    model_make("gpt-b", upstream)
    model = model_make("gpt-main", upstream)
    Model.objects.filter(pk=model.pk).update(fallbacks=["gpt-gone"])  # as an old row might hold
    model.refresh_from_db()
    data = _model_form(root_client, model)
    assert data["fallbacks_0"] == "gpt-gone"

    answer = root_client.post(f"/admin/proxy/model/{model.pk}/change/", data)

    assert answer.status_code == 200
    assert "Unknown model “gpt-gone”." in answer.content.decode()
