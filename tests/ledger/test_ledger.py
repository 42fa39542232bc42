"""The usage ledger in one process: exactly one row per call, idempotent writes, the spool, overflow.

Calls go through the live gateway with the official ``openai`` client; the test hands the usage on with
``emitter.flush()`` (the suite runs no background usage thread). Faults are real: a broker address nothing
listens on, a spool directory that cannot be created.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from django.conf import settings

from apiforge.celery import app as celery_app
from gateway_stats.ledger import ledger_write, usage_row
from gateway_stats.models import UsageRecord
from gateway_stats.spool import Spool
from gateway_stats.transport import ledger_transport, spool_size_bytes, transport_mode
from gateway_stats.usage import UsageEvent, emitter, event_id_new, usage_event_emit
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make

pytestmark = pytest.mark.usefixtures("database_transport")

MESSAGES = [{"role": "user", "content": "count these five words"}]
PRICE_IN, PRICE_OUT = Decimal("0.5"), Decimal("1.5")


@pytest.fixture
def client(live_gateway, fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url, timeout_s=5)
    model_make("gpt-test", upstream, upstream_model="fake-model-1", input_price="0.5", output_price="1.5")
    key = key_make()
    client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key.secret, max_retries=0, timeout=10)
    client.key = key  # type: ignore[attr-defined]
    return client


def _call(client: openai.OpenAI, index: int) -> str:
    request_id = f"ledger-{index}"
    if index % 2:
        chunks = list(
            client.chat.completions.create(
                model="gpt-test", messages=MESSAGES, stream=True, extra_headers={"x-request-id": request_id}
            )
        )
        assert chunks
    else:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_headers={"x-request-id": request_id})
    return request_id


def _expected_cost(prompt: int, completion: int) -> Decimal:
    return (prompt * PRICE_IN + completion * PRICE_OUT) / 1000


def test_concurrent_calls_give_exactly_one_row_each_with_the_upstreams_tokens_and_cost(client):
    calls = 24
    with ThreadPoolExecutor(8) as pool:
        request_ids = list(pool.map(lambda i: _call(client, i), range(calls)))

    emitter.flush()

    rows = list(UsageRecord.objects.filter(request_id__startswith="ledger-"))
    assert sorted(row.request_id for row in rows) == sorted(request_ids)
    expected = FakeUpstream.expected_usage(MESSAGES)
    for row in rows:
        assert (row.prompt_tokens, row.completion_tokens) == (expected["prompt_tokens"], expected["completion_tokens"])
        assert row.total_tokens == expected["total_tokens"]
        assert row.cost == _expected_cost(row.prompt_tokens, row.completion_tokens)
        assert (row.input_price_per_1k, row.output_price_per_1k) == (PRICE_IN, PRICE_OUT)
        assert row.key_id == client.key.pk
        assert row.user_id == client.key.owner_id
        assert row.key_prefix == client.key.prefix
        assert (row.model, row.upstream, row.upstream_model) == ("gpt-test", "fake", "fake-model-1")
        assert (row.endpoint, row.method, row.status, row.error_code) == ("/v1/chat/completions", "POST", 200, "")
        assert row.stream is (int(row.request_id.split("-")[1]) % 2 == 1)
        assert row.request_bytes > 0
        assert row.response_bytes > 0
        assert row.latency_ms > 0
        assert row.client_ip == "127.0.0.1"
        if row.stream:
            assert 0 < row.ttfb_ms <= row.latency_ms
    emitter.flush()
    assert UsageRecord.objects.filter(request_id__startswith="ledger-").count() == calls, "flushing again adds nothing"


def test_refused_calls_are_in_the_ledger_too(client):
    bad = openai.OpenAI(base_url=client.base_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="gpt-test", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)

    emitter.flush()

    rows = {row.error_code: row for row in UsageRecord.objects.all()}
    assert rows["invalid_api_key"].status == 401
    assert rows["invalid_api_key"].key_id is None
    assert rows["model_not_found"].status == 404
    assert rows["model_not_found"].key_id == client.key.pk


def _event(**fields) -> UsageEvent:
    event = UsageEvent(request_id=fields.pop("request_id", "r"), endpoint="/v1/chat/completions", status=200, **fields)
    event.event_id = event.event_id or event_id_new()
    return event


@pytest.mark.django_db
def test_a_batch_written_twice_is_in_the_ledger_once():
    rows = [usage_row(_event(request_id=f"twice-{i}", prompt_tokens=i)) for i in range(5)]

    first = ledger_write(rows)
    second = ledger_write(rows + rows[:2])

    assert len(first) == 5
    assert second == []
    assert UsageRecord.objects.count() == 5
    assert ledger_write([]) == []


@pytest.mark.django_db
def test_a_request_id_a_client_reuses_loses_no_call():
    ledger_write([usage_row(_event(request_id="same")), usage_row(_event(request_id="same"))])

    assert UsageRecord.objects.filter(request_id="same").count() == 2


@pytest.mark.django_db
def test_the_cost_is_computed_from_the_prices_that_rode_on_the_event():
    event = _event(
        prompt_tokens=1234,
        completion_tokens=567,
        input_price_per_1k=Decimal("0.003"),
        output_price_per_1k=Decimal("0.015"),
    )
    ledger_write([usage_row(event)])

    row = UsageRecord.objects.get()
    assert (
        row.cost == event.cost == Decimal("1234") * Decimal("0.003") / 1000 + Decimal("567") * Decimal("0.015") / 1000
    )


@pytest.fixture
def broker_unreachable(settings):
    """USAGE_TRANSPORT=celery with the broker at a port nothing listens on (the producer pool rebuilt)."""
    settings.USAGE_TRANSPORT = "celery"
    settings.USAGE_TRANSPORT_RETRY_S = 0
    saved = celery_app.conf.broker_url, celery_app.conf.broker_write_url
    saved_eager = celery_app.conf.task_always_eager
    # The embedded default (no broker configured) runs tasks eagerly, which never reaches a broker: publish for real.
    celery_app.conf.task_always_eager = False
    celery_app.conf.broker_url = celery_app.conf.broker_write_url = "redis://127.0.0.1:1/0"
    # New pools for the unreachable URL; the real broker's pools stay open: kombu keeps them in a registry
    # keyed by URL, so closing one here would hand a closed pool to every later publish.
    celery_app._pool = None
    celery_app.amqp._producer_pool = None
    yield
    celery_app.pool.force_close_all()  # the unreachable URL's pool
    celery_app.conf.broker_url, celery_app.conf.broker_write_url = saved
    celery_app.conf.task_always_eager = saved_eager
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@pytest.mark.django_db(transaction=True)
def test_broker_unreachable_spools_every_batch_and_the_spool_replays_in_order_once_it_answers(
    broker_unreachable, settings, caplog
):
    assert transport_mode() == "celery"
    for batch in range(3):
        for i in range(4):
            usage_event_emit(_event(request_id=f"spooled-{batch}-{i}"))
        emitter.flush()

    assert UsageRecord.objects.count() == 0
    assert spool_size_bytes() > 0
    assert [r.getMessage() for r in caplog.records if r.name == "gateway_stats.transport"][0].startswith(
        "usage transport (celery) unavailable"
    )

    settings.USAGE_TRANSPORT = "database"  # the transport answers again
    with caplog.at_level(logging.INFO, logger="gateway_stats.transport"):
        emitter.flush()  # nothing queued: the tick replays the spool

    assert UsageRecord.objects.count() == 12
    assert spool_size_bytes() == 0
    assert any("12 records replayed" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db(transaction=True)
def test_while_the_spool_holds_batches_new_ones_queue_behind_them(broker_unreachable, settings):
    usage_event_emit(_event(request_id="first"))
    emitter.flush()
    settings.USAGE_TRANSPORT = "database"
    settings.USAGE_TRANSPORT_RETRY_S = 60
    ledger_transport._retry_at = 1e18  # still within the retry pause: the new batch goes behind the spooled one

    usage_event_emit(_event(request_id="second"))
    emitter.flush()
    assert UsageRecord.objects.count() == 0

    ledger_transport._retry_at = 0
    emitter.flush()
    assert list(UsageRecord.objects.order_by("id").values_list("request_id", flat=True)) == ["first", "second"]


@pytest.mark.django_db(transaction=True)
def test_an_overfilled_queue_spools_instead_of_dropping(monkeypatch):
    monkeypatch.setattr(emitter, "max_queue", 10)
    monkeypatch.setattr(emitter, "max_batch", 25)
    for i in range(100):
        usage_event_emit(_event(request_id=f"over-{i}"))

    emitter.flush()

    # The first batches left while the queue was over its bound: spooled, then replayed by the tick.
    assert UsageRecord.objects.count() == 100
    assert spool_size_bytes() == 0


@pytest.mark.django_db(transaction=True)
def test_a_spool_left_by_a_dead_process_is_adopted_and_replayed(tmp_path, settings):
    settings.USAGE_SPOOL_DIR = str(tmp_path)
    rows = [usage_row(_event(request_id=f"orphan-{i}")) for i in range(3)]
    script = (
        "import sys, orjson; from gateway_stats.spool import Spool; "
        f"Spool({str(tmp_path)!r}).append(orjson.loads(sys.stdin.buffer.read()))"
    )
    import orjson

    subprocess.run(
        [sys.executable, "-c", script], input=orjson.dumps(rows), check=True, cwd=settings.BASE_DIR, env=os.environ
    )
    assert len(list(tmp_path.glob("*.spool"))) == 1

    emitter.flush()

    assert UsageRecord.objects.count() == 3
    assert list(tmp_path.glob("*.spool")) == [], "an adopted spool is removed once replayed"


@pytest.mark.django_db(transaction=True)
def test_a_live_processs_spool_is_left_to_it(tmp_path, settings):
    settings.USAGE_SPOOL_DIR = str(tmp_path)
    other = Spool(tmp_path)  # holds its lock like another live process would
    other.append([usage_row(_event(request_id="theirs"))])
    other._own_pid = os.getpid() + 1  # not this process's own file any more, but still locked

    emitter.flush()

    assert UsageRecord.objects.count() == 0
    assert spool_size_bytes() > 0


def test_a_torn_line_is_skipped_with_a_warning(tmp_path, caplog):
    spool = Spool(tmp_path)
    spool.append([{"event_id": "a"}])
    with open(next(tmp_path.glob("*.spool")), "ab") as handle:
        handle.write(b'[{"event_id": "b", "sta')  # the process died in the middle of this write
    got: list[list[dict]] = []

    assert spool.replay(got.append) == 1

    assert got == [[{"event_id": "a"}]]
    assert "torn line" in caplog.text
    assert spool.size_bytes() == 0


def test_a_failed_replay_keeps_what_was_not_sent(tmp_path):
    spool = Spool(tmp_path)
    for i in range(3):
        spool.append([{"event_id": str(i)}])
    sent: list[str] = []

    def deliver(rows):
        if rows[0]["event_id"] == "1":
            raise ConnectionError("down again")
        sent.append(rows[0]["event_id"])

    assert spool.replay(deliver) == 1
    assert spool.replay(lambda rows: sent.append(rows[0]["event_id"])) == 2
    assert sent == ["0", "1", "2"]


@pytest.mark.expect_error_log
def test_a_spool_that_cannot_be_written_counts_and_logs_the_drop_once(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    dropped: list[int] = []
    spool = Spool(blocker / "spool", on_drop=dropped.append)

    assert spool.append([{"event_id": "a"}]) is False
    assert spool.append([{"event_id": "b"}, {"event_id": "c"}]) is False

    assert dropped == [1, 2]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "1 usage records dropped" in errors[0].getMessage()


def test_the_spool_directory_default_is_per_run_in_tests():
    assert Path(settings.USAGE_SPOOL_DIR).name.startswith("apiforge-test-spool-")
