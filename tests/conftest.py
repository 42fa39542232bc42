"""Suite-wide fixtures: unexpected ERROR logs and leaked secrets fail a test; Redis keys of the run are removed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.core.cache import cache

from apiforge.local_cache import local_caches_clear
from gateway_stats.transport import ledger_transport
from gateway_stats.usage import emitter
from keys.services import key_usage_forget
from proxy.edge.breaker import breakers_forget
from proxy.edge.limits import limits_forget

# The secret-leak check (every test): see its module docstring.
pytest_plugins = ["tests.secret_leaks"]


class _ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_unexpected_error_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """Any ERROR logged during a test fails it, unless the test is marked ``expect_error_log``."""
    collector = _ErrorCollector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield
    finally:
        root.removeHandler(collector)
    if request.node.get_closest_marker("expect_error_log"):
        return
    if collector.records:
        lines = "\n".join(f"{r.name}: {r.getMessage()}" for r in collector.records)
        pytest.fail(f"unexpected ERROR log lines:\n{lines}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Captured output that is not valid UTF-8 (a test logging a lone surrogate on purpose) is escaped in the
    report: pytest-xdist sends reports between processes as UTF-8 and would stop its worker on it."""
    report: pytest.TestReport = yield
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode()) for title, text in report.sections]
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "expect_error_log: the test expects ERROR log lines")


@pytest.fixture(scope="session", autouse=True)
def _usage_flushed_by_tests() -> Iterator[None]:
    """No background usage thread in the suite: a test hands its records on with ``emitter.flush()``, in its
    own database transaction (a thread writing the ledger behind a test's back would race its transaction)."""
    emitter.autostart = False
    yield
    emitter.autostart = True


@pytest.fixture(autouse=True)
def _clear_cache() -> Iterator[None]:
    """Each test starts with an empty cache (only this run's prefixed keys are touched)."""
    yield
    emitter.discard()  # this test's usage records never reach the next test (tests flush what they check)
    ledger_transport.reset()
    if settings.REDIS_URL:
        _delete_prefixed_keys()
    else:
        cache.clear()
    local_caches_clear()
    key_usage_forget()
    breakers_forget()  # breaker and health state live in the process; SQLite tests reuse deployment ids
    limits_forget()  # the in-process limiter's counters (and a Redis limiter's client of this test's loop)


def _delete_prefixed_keys() -> None:
    from django_redis import get_redis_connection

    conn = get_redis_connection("default")
    for key in conn.scan_iter(match=f"{settings.CACHE_KEY_PREFIX}*", count=1000):
        conn.delete(key)


@pytest.fixture(scope="session", autouse=True)
def _close_other_threads_connections(django_db_setup, django_db_blocker) -> Iterator[None]:
    """Live servers and background threads hold their own connections: end them before the test
    database is dropped, so PostgreSQL lets it go and the run leaves nothing behind."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
