"""The access log: one structured line per proxied call, from the usage thread; ACCESS_LOG=false turns it off."""

from __future__ import annotations

import copy
import json
import logging
import logging.config
from typing import Any

import pytest
from django.conf import settings as django_settings

from gateway_stats.usage import emitter
from tests.observability.conftest import MESSAGES
from tests.proxy.fake_upstream import FakeUpstream

FIELDS = {
    "request_id",
    "key_prefix",
    "method",
    "endpoint",
    "model",
    "upstream",
    "status",
    "error_code",
    "stream",
    "latency_ms",
    "ttfb_ms",
    "prompt_tokens",
    "completion_tokens",
    "client_ip",
}


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "apiforge.access"]


def test_one_line_per_call_with_its_fields_written_at_flush_not_during_the_request(
    gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    emitter.flush()
    with caplog.at_level(logging.INFO, logger="apiforge.access"):
        gateway.client.chat.completions.create(
            model="gpt-obs", messages=MESSAGES, extra_headers={"x-request-id": "acc-1"}
        )
        chunks = gateway.client.chat.completions.create(
            model="gpt-obs", messages=MESSAGES, stream=True, extra_headers={"x-request-id": "acc-2"}
        )
        assert list(chunks)
        with pytest.raises(Exception, match="404"):
            gateway.client.chat.completions.create(
                model="no-such-model", messages=MESSAGES, extra_headers={"x-request-id": "acc-3"}
            )
        assert _access_lines(caplog) == [], "nothing is logged on the request path"
        emitter.flush()
    lines = {record.request_id: record for record in _access_lines(caplog)}  # type: ignore[attr-defined]

    assert set(lines) == {"acc-1", "acc-2", "acc-3"}
    expected = FakeUpstream.expected_usage(MESSAGES)
    plain, stream, refused = lines["acc-1"], lines["acc-2"], lines["acc-3"]
    for record in lines.values():
        assert record.levelno == logging.INFO
        assert FIELDS <= set(vars(record)), FIELDS - set(vars(record))
        assert record.key_prefix == gateway.key.prefix  # type: ignore[attr-defined]
        assert record.method == "POST"  # type: ignore[attr-defined]
        assert record.endpoint == "/v1/chat/completions"  # type: ignore[attr-defined]
        assert record.client_ip == "127.0.0.1"  # type: ignore[attr-defined]
        assert record.latency_ms > 0  # type: ignore[attr-defined]
    assert (plain.model, plain.upstream, plain.status, plain.stream) == ("gpt-obs", "obs-upstream", 200, False)  # type: ignore[attr-defined]
    assert (plain.prompt_tokens, plain.completion_tokens) == (expected["prompt_tokens"], expected["completion_tokens"])  # type: ignore[attr-defined]
    assert plain.getMessage().startswith("POST /v1/chat/completions 200 gpt-obs ")
    assert stream.stream is True  # type: ignore[attr-defined]
    assert 0 < stream.ttfb_ms <= stream.latency_ms  # type: ignore[attr-defined]
    assert (refused.status, refused.error_code, refused.model) == (404, "model_not_found", "")  # type: ignore[attr-defined]


def test_the_json_formatter_of_the_settings_writes_every_field_and_no_secret_or_body(
    gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    formatter_config = copy.deepcopy(django_settings.LOGGING["formatters"]["json"])
    formatter = logging.config.DictConfigurator({}).configure_formatter(formatter_config)
    emitter.flush()
    with caplog.at_level(logging.INFO, logger="apiforge.access"):
        gateway.client.chat.completions.create(
            model="gpt-obs", messages=MESSAGES, extra_headers={"x-request-id": "json-1"}
        )
        emitter.flush()
    (record,) = _access_lines(caplog)

    line = formatter.format(record)
    document = json.loads(line)
    assert FIELDS <= set(document)
    assert document["logger"] == "apiforge.access"
    assert document["level"] == "INFO"
    assert document["request_id"] == "json-1"
    assert document["model"] == "gpt-obs"
    assert document["status"] == 200
    assert gateway.key.secret not in line
    assert MESSAGES[0]["content"] not in line
    assert FakeUpstream.expected_content(MESSAGES) not in line


def test_access_log_false_turns_it_off(gateway: Any, settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.ACCESS_LOG = False
    emitter.flush()
    with caplog.at_level(logging.INFO, logger="apiforge.access"):
        gateway.client.chat.completions.create(model="gpt-obs", messages=MESSAGES)
        assert emitter.flush() == 1
    assert _access_lines(caplog) == []


def test_a_path_a_client_made_up_is_logged_as_other(gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    emitter.flush()
    with caplog.at_level(logging.INFO, logger="apiforge.access"):
        answer = httpx.post(
            gateway.live.url("/v1/anything/typed-here"), headers={"Authorization": f"Bearer {gateway.key.secret}"}
        )
        assert answer.status_code == 404
        emitter.flush()
    (record,) = _access_lines(caplog)
    assert record.endpoint == "other"  # type: ignore[attr-defined]
    assert "typed-here" not in record.getMessage()
