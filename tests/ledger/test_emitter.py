"""The usage emitter's own thread (the suite's global emitter has none): flushes on its interval, on a full
batch and at stop; failing sinks and ticks are logged, not fatal; a forked child gets ids of its own."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from gateway_stats.ledger import usage_row
from gateway_stats.models import UsageRecord
from gateway_stats.tasks import usage_ingest
from gateway_stats.usage import UsageEmitter, UsageEvent, event_id_new

WAIT_S = 5.0


def _event(i: int = 0) -> UsageEvent:
    return UsageEvent(request_id=f"e-{i}", endpoint="/v1/chat/completions", status=200)


def _wait(predicate) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_thread_flushes_on_its_interval_and_stop_flushes_the_rest():
    got: list[UsageEvent] = []
    emitter = UsageEmitter(flush_interval=0.05)
    emitter.sinks = [got.extend]

    try:
        emitter.emit(_event(1))  # the first event starts the thread
        assert _wait(lambda: len(got) == 1)
        assert got[0].event_id, "each event gets its ledger id on the emitter's thread"

        emitter.flush_interval = 60
        time.sleep(0.1)  # the thread is now waiting out a long interval
        emitter.emit(_event(2))
    finally:
        emitter.stop()
    assert [event.request_id for event in got] == ["e-1", "e-2"]
    assert emitter.queue_depth() == 0


def test_a_full_batch_wakes_the_thread_before_its_interval():
    got: list[UsageEvent] = []
    emitter = UsageEmitter(flush_interval=60, max_batch=10)
    emitter.sinks = [got.extend]
    emitter.start()
    try:
        for i in range(10):
            emitter.emit(_event(i))
        assert _wait(lambda: len(got) == 10)
    finally:
        emitter.stop()


def test_start_twice_keeps_one_thread():
    emitter = UsageEmitter(flush_interval=60)
    emitter.start()
    first = emitter._thread
    try:
        emitter.start()
        assert emitter._thread is first
    finally:
        emitter.stop()
    assert not any(thread.name == "usage-emitter" and thread is first for thread in threading.enumerate())


@pytest.mark.expect_error_log
def test_a_failing_sink_or_tick_is_logged_and_the_others_still_run(caplog):
    got: list[UsageEvent] = []
    ticks: list[int] = []

    def broken(batch: list[UsageEvent]) -> None:
        raise RuntimeError("sink down")

    def broken_tick() -> None:
        raise RuntimeError("tick down")

    emitter = UsageEmitter()
    emitter.autostart = False  # no thread: it would keep logging this tick's failure into later tests
    emitter.sinks = [broken, got.extend]
    emitter.ticks = [broken_tick, lambda: ticks.append(1)]
    emitter.emit(_event())

    assert emitter.flush() == 1
    assert emitter._thread is None

    assert len(got) == 1
    assert ticks == [1]
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert any("failed on 1 records" in message for message in messages)
    assert any("usage tick" in message for message in messages)


def test_the_debug_log_sink_describes_each_event(caplog):
    from gateway_stats.usage import _log_sink

    with caplog.at_level(logging.DEBUG, logger="gateway_stats.usage"):
        _log_sink([_event(7)])

    assert "usage e-7 /v1/chat/completions" in caplog.text


def test_a_forked_child_makes_ids_of_its_own():
    parent = event_id_new()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.write(write, event_id_new().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert child[:16] != parent[:16]


@pytest.mark.django_db
def test_the_ingest_task_writes_a_batch_once_however_often_it_runs():
    event = _event(3)
    event.event_id = event_id_new()
    rows = [usage_row(event)]

    assert usage_ingest.apply(args=[rows]).get() == 1
    assert usage_ingest.apply(args=[rows]).get() == 0

    assert UsageRecord.objects.count() == 1
