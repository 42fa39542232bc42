"""The access log: one structured line per proxied call, from the usage thread; ACCESS_LOG=false turns it off.

Two ways a line is written (gateway_stats/access_log.py): the settings' handler of ``apiforge.access`` formats a
whole batch at once and writes it to its stream (``access_stream``: that handler alone, on a StringIO); any other
handler gets a ``LogRecord`` per call (``caplog``: pytest attaches its handler to the non-propagating logger).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import logging.config
import sys
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from django.conf import settings as django_settings

from gateway_stats.access_log import AccessLogFormatter, AccessLogHandler, access_log_fields, usage_access_log_sink
from gateway_stats.usage import UsageEvent
from tests.observability.conftest import MESSAGES
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import usage_flush

FIELDS = {
    "request_id",
    "key_prefix",
    "method",
    "endpoint",
    "model",
    "route",
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


def formatter_of_settings(name: str) -> logging.Formatter:
    config = copy.deepcopy(django_settings.LOGGING["formatters"][name])
    return logging.config.DictConfigurator({}).configure_formatter(config)  # type: ignore[no-any-return]


class AccessStream:
    """The settings' access-log handler writing to a StringIO; ``lines()`` what it wrote so far."""

    def __init__(self, handler: AccessLogHandler) -> None:
        self.handler = handler
        self.buffer = io.StringIO()

    def use(self, formatter_name: str) -> None:
        self.handler.setFormatter(formatter_of_settings(formatter_name))

    def lines(self) -> list[str]:
        text = self.buffer.getvalue()
        return text.removesuffix("\n").split("\n") if text else []  # "\n" only: a line may hold U+2028

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def access_stream() -> Iterator[AccessStream]:
    """The settings' handler of the logger on a StringIO (pytest attaches its own beside it: they get records)."""
    access = logging.getLogger("apiforge.access")
    saved_level = access.level
    (handler,) = [handler for handler in access.handlers if isinstance(handler, AccessLogHandler)]
    stream = AccessStream(handler)
    saved_stream, saved_formatter = handler.setStream(stream.buffer), handler.formatter  # type: ignore[arg-type]
    access.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        access.setLevel(saved_level)
        handler.setStream(saved_stream)  # type: ignore[arg-type]
        handler.setFormatter(saved_formatter)


def call(request_id: str, **fields: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "endpoint": "/v1/chat/completions",
        "status": 200,
        "model": "gpt-obs",
        "upstream": "obs-upstream",
        "key_prefix": "afk_pub",
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "latency_ms": 12.34567,
        "ttfb_ms": 1.5,
        "client_ip": "10.0.0.1",
    }
    values.update(fields)
    return UsageEvent(request_id=request_id, **values)


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "apiforge.access"]


def test_one_line_per_call_with_its_fields_written_at_flush_not_during_the_request(
    gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    usage_flush()
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
        usage_flush()
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
    formatter = formatter_of_settings("access_json")  # the access log's formatter with LOG_FORMAT=json
    usage_flush()
    with caplog.at_level(logging.INFO, logger="apiforge.access"):
        gateway.client.chat.completions.create(
            model="gpt-obs", messages=MESSAGES, extra_headers={"x-request-id": "json-1"}
        )
        usage_flush()
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
    usage_flush()
    with caplog.at_level(logging.INFO, logger="apiforge.access"):
        gateway.client.chat.completions.create(model="gpt-obs", messages=MESSAGES)
        assert usage_flush() == 1
    assert _access_lines(caplog) == []


def test_a_path_a_client_made_up_is_logged_as_other(gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    usage_flush()
    with caplog.at_level(logging.INFO, logger="apiforge.access"):
        answer = httpx.post(
            gateway.live.url("/v1/anything/typed-here"), headers={"Authorization": f"Bearer {gateway.key.secret}"}
        )
        assert answer.status_code == 404
        usage_flush()
    (record,) = _access_lines(caplog)
    assert record.endpoint == "other"  # type: ignore[attr-defined]
    assert "typed-here" not in record.getMessage()


# --- the settings' handler: a whole batch at a time --------------------------------------------------------


def test_the_handler_of_the_settings_writes_one_json_line_per_call_with_every_field_and_no_secret(
    gateway: Any, access_stream: AccessStream
) -> None:
    access_stream.use("access_json")
    usage_flush()
    gateway.client.chat.completions.create(model="gpt-obs", messages=MESSAGES, extra_headers={"x-request-id": "b-1"})
    for _ in gateway.client.chat.completions.create(
        model="gpt-obs", messages=MESSAGES, stream=True, extra_headers={"x-request-id": "b-2"}
    ):
        pass
    assert access_stream.lines() == [], "nothing is written on the request path"
    usage_flush()

    text = access_stream.buffer.getvalue()
    documents = {document["request_id"]: document for document in access_stream.documents()}
    assert len(access_stream.lines()) == 2
    assert set(documents) == {"b-1", "b-2"}
    expected = FakeUpstream.expected_usage(MESSAGES)
    plain = documents["b-1"]
    assert FIELDS | {"time", "level", "logger", "message"} == set(plain)
    assert (plain["level"], plain["logger"]) == ("INFO", "apiforge.access")
    assert (plain["model"], plain["upstream"], plain["status"], plain["stream"]) == (
        "gpt-obs",
        "obs-upstream",
        200,
        False,
    )
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (
        expected["prompt_tokens"],
        expected["completion_tokens"],
    )
    assert plain["key_prefix"] == gateway.key.prefix
    assert plain["message"].startswith("POST /v1/chat/completions 200 gpt-obs ")
    assert documents["b-2"]["stream"] is True
    assert gateway.key.secret not in text
    assert MESSAGES[0]["content"] not in text
    assert FakeUpstream.expected_content(MESSAGES) not in text


def test_a_batch_line_is_the_line_of_the_same_record(access_stream: AccessStream) -> None:
    access_stream.use("access_json")
    event = call("same-1", error_code="upstream_timeout", status=504, stream=True)
    usage_access_log_sink([event])
    (batch_line,) = access_stream.documents()

    record = logging.getLogger("apiforge.access").makeRecord(
        "apiforge.access", logging.INFO, __file__, 0, "%s %s %s %s %.1fms", (), None, extra=access_log_fields(event)
    )
    record.msg, record.args = batch_line["message"], ()
    record_line = json.loads(formatter_of_settings("access_json").format(record))
    assert batch_line.pop("time")
    assert record_line.pop("time")
    assert list(batch_line) == list(record_line), "the same keys in the same order"
    assert batch_line == record_line
    assert batch_line["latency_ms"] == 12.346
    assert batch_line["message"] == "POST /v1/chat/completions 504 gpt-obs 12.3ms"


def test_request_ids_and_values_that_look_like_json_stay_inside_their_line(access_stream: AccessStream) -> None:
    access_stream.use("access_json")
    tricky = ['a"},{"time":"x"}', 'b\n{"time":', 'c},{"time":', "d\u2028\u0000"]
    usage_access_log_sink([call(request_id, model=request_id) for request_id in tricky])

    documents = access_stream.documents()
    assert [document["request_id"] for document in documents] == tricky
    assert [document["model"] for document in documents] == tricky


def test_a_string_orjson_refuses_is_still_one_line(access_stream: AccessStream) -> None:
    access_stream.use("access_json")
    usage_access_log_sink([call("ok-1"), call("surrogate", model="bad\ud800")])
    documents = access_stream.documents()
    assert [document["request_id"] for document in documents] == ["ok-1", "surrogate"]
    assert documents[1]["model"] == "bad\ud800"


def test_the_console_format_of_development(access_stream: AccessStream) -> None:
    access_stream.use("access_console")
    usage_access_log_sink([call("con-1"), call("con-2", model="", status=404)])
    first, second = access_stream.lines()
    assert first.endswith(" INFO    [con-1] apiforge.access: POST /v1/chat/completions 200 gpt-obs 12.3ms")
    assert second.endswith(" INFO    [con-2] apiforge.access: POST /v1/chat/completions 404 - 12.3ms")
    assert first[:4].isdigit(), "it starts with the time"


@pytest.mark.parametrize(
    ("fmt", "style", "expected"),
    [
        ("%(levelname)s %(key_prefix)s %(prompt_tokens)d %(message)s", "%", "INFO afk_pub 3 POST"),
        ("{levelname} {key_prefix} {message}", "{", "INFO afk_pub POST"),
    ],
)
def test_a_console_format_that_names_the_fields_gets_them(
    access_stream: AccessStream, fmt: str, style: Literal["%", "{"], expected: str
) -> None:
    access_stream.handler.setFormatter(AccessLogFormatter(fmt, style=style))
    usage_access_log_sink([call("named-1")])
    (line,) = access_stream.lines()
    assert line.startswith(expected)


def test_a_handler_with_another_formatter_gets_records(access_stream: AccessStream) -> None:
    access_stream.handler.setFormatter(logging.Formatter("%(request_id)s|%(model)s|%(message)s"))
    usage_access_log_sink([call("plain-1")])
    access_stream.handler.emit_batch([call("plain-2")])  # written the same way when handed a batch
    assert access_stream.lines() == [
        "plain-1|gpt-obs|POST /v1/chat/completions 200 gpt-obs 12.3ms",
        "plain-2|gpt-obs|POST /v1/chat/completions 200 gpt-obs 12.3ms",
    ]


def test_a_stream_that_fails_never_reaches_the_usage_thread(
    access_stream: AccessStream, capsys: pytest.CaptureFixture[str]
) -> None:
    access_stream.use("access_json")
    access_stream.buffer.close()
    usage_access_log_sink([call("lost-1")])  # returns: logging reports its own error on stderr
    assert "Logging error" in capsys.readouterr().err


def test_a_level_above_info_turns_it_off(access_stream: AccessStream) -> None:
    logging.getLogger("apiforge.access").setLevel(logging.WARNING)
    usage_access_log_sink([call("quiet-1")])
    assert access_stream.lines() == []


def test_a_propagating_logger_gets_records_on_every_handler(
    access_stream: AccessStream, caplog: pytest.LogCaptureFixture
) -> None:
    access_stream.use("access_console")
    access = logging.getLogger("apiforge.access")
    access.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="apiforge.access"):
            usage_access_log_sink([call("up-1")])
    finally:
        access.propagate = False
    (line,) = access_stream.lines()
    assert line.endswith("[up-1] apiforge.access: POST /v1/chat/completions 200 gpt-obs 12.3ms")
    assert {record.request_id for record in _access_lines(caplog)} == {"up-1"}  # type: ignore[attr-defined]


def test_the_json_formatter_writes_an_exception_logged_on_the_access_logger() -> None:
    formatter = formatter_of_settings("access_json")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("apiforge.access").makeRecord(
            "apiforge.access", logging.ERROR, __file__, 0, "failed", (), sys.exc_info()
        )
    document = json.loads(formatter.format(record))
    assert (document["level"], document["message"], document["request_id"]) == ("ERROR", "failed", "-")
    assert "ValueError: boom" in document["exc_info"]
