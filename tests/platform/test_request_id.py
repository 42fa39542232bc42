"""x-request-id: kept when sane, replaced otherwise, on every answer and on the log lines of the request."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
from django.test import Client

from apiforge.request_id import RequestIdLogFilter

pytestmark = pytest.mark.django_db

# What a generated id looks like is the middleware's business; it must be sane itself (1-128 safe characters).
GENERATED = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@pytest.mark.parametrize("incoming", ["abc-123", "trace.01:span_02", "a" * 128, "0f" * 16])
def test_a_sane_incoming_id_is_kept(client: Client, incoming: str) -> None:
    response = client.get("/health", HTTP_X_REQUEST_ID=incoming)

    assert response["x-request-id"] == incoming


@pytest.mark.parametrize("incoming", ["", "has space", "a" * 129, "<script>", "semi;colon", "ünïcode"])
def test_an_insane_incoming_id_is_replaced_by_a_fresh_one(client: Client, incoming: str) -> None:
    response = client.get("/health", HTTP_X_REQUEST_ID=incoming)

    assert GENERATED.match(response["x-request-id"])
    assert response["x-request-id"] != incoming


def test_each_request_without_an_id_gets_its_own(client: Client) -> None:
    first = client.get("/health")["x-request-id"]
    second = client.get("/health")["x-request-id"]

    assert GENERATED.match(first)
    assert GENERATED.match(second)
    assert first != second


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("get", "/health", 200),
        ("get", "/health/ready", 200),
        ("get", "/no/such/page", 404),
        ("get", "/auth/me", 401),
        ("post", "/auth/login", 400),
        ("put", "/auth/login", 405),
        ("get", "/api/schema/", 200),
        ("get", "/admin/", 302),
    ],
)
def test_every_answer_carries_the_request_id(client: Client, method: str, path: str, status: int) -> None:
    response = getattr(client, method)(path, content_type="application/json", HTTP_X_REQUEST_ID="rid-42")

    assert response.status_code == status
    assert response["x-request-id"] == "rid-42"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdLogFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def accounts_log() -> Iterator[_Collect]:
    handler = _Collect()
    logger = logging.getLogger("accounts")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_log_lines_written_during_a_request_carry_its_id_and_others_a_dash(
    client: Client, accounts_log: _Collect
) -> None:
    client.post(
        "/auth/login",
        {"username": "nobody", "password": "x"},
        content_type="application/json",
        HTTP_X_REQUEST_ID="login-attempt-1",
    )
    logging.getLogger("accounts").info("outside any request")

    assert [(r.getMessage(), r.request_id) for r in accounts_log.records] == [  # type: ignore[attr-defined]
        ("login failed: username=nobody ip=127.0.0.1", "login-attempt-1"),
        ("outside any request", "-"),
    ]
