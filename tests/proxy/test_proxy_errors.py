"""Every proxy refusal, OpenAI-shaped, through both front doors: the lean ASGI path and Django's views.

``via`` runs each test twice: against a live gateway (``apiforge.asgi`` dispatching ``/v1/`` and ``/gw/`` to the
lean app) and through Django's test client (``proxy/views.py`` behind Django's request cycle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient
from django.utils import timezone

from proxy.upstream_client import upstream_session_close
from tests.proxy.helpers import key_make, model_make, upstream_make


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Transport:
    def request(self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
        raise NotImplementedError


class LeanTransport(Transport):
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def request(self, method, path, *, body=b"", headers=None):
        response = httpx.request(method, self.base_url + path, content=body, headers=headers or {}, timeout=10)
        return Answer(response.status_code, dict(response.headers), response.content)


class DjangoTransport(Transport):
    def __init__(self) -> None:
        self.client = AsyncClient()

    def request(self, method, path, *, body=b"", headers=None):
        return async_to_sync(self._request)(method, path, body, headers or {})

    async def _request(self, method, path, body, headers):
        try:
            response = await self.client.generic(
                method, path, data=body, content_type="application/json", headers=headers
            )
            if response.streaming:
                content = b"".join([chunk async for chunk in response.streaming_content])
            else:
                content = response.content
        finally:
            # The upstream pool belongs to this event loop, which ends with the call: close it with it.
            await upstream_session_close()
        return Answer(response.status_code, {k.lower(): v for k, v in response.items()}, content)


@pytest.fixture(params=["lean", "django"])
def via(request) -> Transport:
    if request.param == "lean":
        return LeanTransport(request.getfixturevalue("live_gateway").base_url)
    request.getfixturevalue("transactional_db")
    return DjangoTransport()


@pytest.fixture
def demo(transactional_db):
    upstream = upstream_make(name="mock", kind="mock")
    model_make("demo", upstream, upstream_model="demo")
    model_make("other", upstream, upstream_model="other")
    return key_make(allowed_models=["demo"])


CHAT = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})


def bearer(key: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.secret}"}


def assert_openai_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, answer.body
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers.get("x-request-id")
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    return error


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda key: {"Authorization": f"Bearer {key.secret}"}, id="bearer"),
        pytest.param(lambda key: {"x-api-key": key.secret}, id="x-api-key"),
        pytest.param(lambda key: {"api-key": key.secret}, id="api-key"),
    ],
)
def test_key_is_accepted_in_each_header(via, demo, headers):
    answer = via.request("POST", "/v1/chat/completions", body=CHAT, headers=headers(demo))
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_missing_key_is_401(via, demo):
    error = assert_openai_error(via.request("POST", "/v1/chat/completions", body=CHAT), 401, "missing_api_key")
    assert error["type"] == "authentication_error"


def test_a_jwt_sent_to_the_proxy_says_an_api_key_is_expected(via, demo):
    from rest_framework_simplejwt.tokens import AccessToken

    from accounts.models import User

    token = str(AccessToken.for_user(User.objects.create_user(username="jwt-holder")))
    answer = via.request("POST", "/v1/chat/completions", body=CHAT, headers={"Authorization": f"Bearer {token}"})
    error = assert_openai_error(answer, 401, "invalid_api_key")
    assert error["message"].startswith("This endpoint expects an APIForge API key")
    assert "/api/" in error["message"]


def test_unknown_key_is_401(via, demo):
    answer = via.request("POST", "/v1/chat/completions", body=CHAT, headers={"Authorization": "Bearer afk-nope"})
    assert_openai_error(answer, 401, "invalid_api_key")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"is_active": False}, "api_key_disabled"),
        ({"expires_at": timezone.now() - timedelta(minutes=1)}, "api_key_expired"),
        ({"is_active": False, "revoked_at": timezone.now()}, "api_key_revoked"),
        ({"ip_allowlist": ["10.0.0.0/8", "2001:db8::/32"]}, "ip_not_allowed"),
    ],
)
def test_refused_keys_are_403_with_the_reason(via, demo, fields, code):
    key = key_make(**fields)
    error = assert_openai_error(via.request("POST", "/v1/chat/completions", body=CHAT, headers=bearer(key)), 403, code)
    assert error["type"] == "permission_error"


def test_key_allowlisting_the_client_ip_is_accepted(via, demo):
    key = key_make(ip_allowlist=["127.0.0.0/8", "::1/128"])
    assert via.request("POST", "/v1/chat/completions", body=CHAT, headers=bearer(key)).status == 200


def test_model_outside_the_key_scope_is_403(via, demo):
    body = orjson.dumps({"model": "other", "messages": [{"role": "user", "content": "hi"}]})
    error = assert_openai_error(
        via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo)), 403, "model_not_allowed"
    )
    assert error["param"] == "model"


def test_unknown_model_is_404(via, demo):
    body = orjson.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    answer = via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo))
    assert_openai_error(answer, 404, "model_not_found")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}), "missing_model", "model"),
        (orjson.dumps({"model": 3, "messages": []}), "missing_model", "model"),
        (orjson.dumps({"model": "demo"}), "missing_messages", "messages"),
        (orjson.dumps({"model": "demo", "messages": []}), "invalid_messages", "messages"),
        (orjson.dumps({"model": "demo", "messages": [{"role": "user"}], "stream": "yes"}), "invalid_stream", "stream"),
    ],
)
def test_bad_bodies_are_400(via, demo, body, code, param):
    answer = via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo))
    error = assert_openai_error(answer, 400, code)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(via, demo, settings):
    settings.PROXY_MAX_BODY_BYTES = 200
    body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * 500}]})
    answer = via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo))
    assert_openai_error(answer, 413, "request_too_large")


@pytest.mark.parametrize(
    ("messages", "given"), [("hi", "a string"), ({"role": "user"}, "an object"), ([], "an empty array")]
)
def test_messages_that_are_not_a_non_empty_array_say_so_instead_of_missing(via, demo, messages, given):
    body = orjson.dumps({"model": "demo", "messages": messages})
    error = assert_openai_error(
        via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo)), 400, "invalid_messages"
    )
    assert error["param"] == "messages"
    assert error["message"] == f"'messages' must be a non-empty array of message objects, not {given}."


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET"), ("DELETE", "/v1/embeddings", "POST")],
)
def test_a_405_names_the_allowed_method(via, demo, method, path, allow):
    answer = via.request(method, path, body=CHAT, headers=bearer(demo))
    assert_openai_error(answer, 405, "method_not_allowed")
    assert answer.headers["allow"] == allow


def test_unknown_path_is_404_and_wrong_method_405(via, demo):
    assert_openai_error(via.request("POST", "/v1/nothing-here", body=CHAT, headers=bearer(demo)), 404, "unknown_url")
    assert_openai_error(via.request("GET", "/v1/chat/completions", headers=bearer(demo)), 405, "method_not_allowed")
    assert_openai_error(via.request("POST", "/v1/models", headers=bearer(demo)), 405, "method_not_allowed")


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/gw/", "/gw/anything", "/gw/v1/chat/completions"])
def test_gateway_path_without_a_route_is_an_openai_shaped_404(live_gateway, demo, method, path):
    # /gw/ is served by the ASGI gateway only (it streams both ways): there is no Django-view variant.
    answer = LeanTransport(live_gateway.base_url).request(method, path, body=CHAT, headers=bearer(demo))
    assert_openai_error(answer, 404, "route_not_found")


def test_models_endpoints_need_a_key(via, demo):
    assert_openai_error(via.request("GET", "/v1/models"), 401, "missing_api_key")
    answer = via.request("GET", "/v1/models", headers=bearer(demo))
    assert answer.status == 200
    assert [m["id"] for m in answer.json()["data"]] == ["demo"]


def test_embeddings_and_completions_need_their_input(via, demo):
    answer = via.request("POST", "/v1/embeddings", body=orjson.dumps({"model": "demo"}), headers=bearer(demo))
    assert_openai_error(answer, 400, "missing_input")
    answer = via.request("POST", "/v1/completions", body=orjson.dumps({"model": "demo"}), headers=bearer(demo))
    assert_openai_error(answer, 400, "missing_prompt")


def test_streamed_answer_is_the_same_through_both_paths(via, demo):
    body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "a b c d"}], "stream": True})
    answer = via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo))
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/event-stream"
    assert answer.headers["cache-control"] == "no-cache"
    events = [e for e in answer.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    text = "".join(
        (orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "")
        for e in events[:-1]
        if orjson.loads(e[6:])["choices"]
    )
    assert text == "echo: a b c d"
    assert not any(b'"usage"' in e for e in events), "usage chunk only when asked for"


@pytest.mark.expect_error_log  # Django's request logger reports 5xx answers on the Django path
def test_model_without_an_active_deployment_is_503(via, demo):
    from proxy.models import Deployment

    Deployment.objects.filter(model__name="demo").update(is_active=False)
    from proxy.catalog import catalog_invalidate

    catalog_invalidate()
    answer = via.request("POST", "/v1/chat/completions", body=CHAT, headers=bearer(demo))
    assert_openai_error(answer, 503, "no_healthy_upstream")


# --- Issue 8: bodies no upstream could be sent, field types, unexpected failures, secrets in messages ---

DEEP = 300  # orjson.loads accepts it (up to 1024 levels), orjson.dumps refuses it (over 254)


def deep_chat(depth: int, *, stream: bool = False) -> bytes:
    content = b"[" * depth + b"]" * depth
    return b'{"model":"demo","stream":%s,"messages":[{"role":"user","content":%s}]}' % (
        b"true" if stream else b"false",
        content,
    )


@pytest.fixture
def on_fake_upstream(demo, fake_upstream):
    """The model ``demo`` moved to a real HTTP upstream (the fake), so the proxy re-encodes and forwards bodies."""
    from proxy.catalog import catalog_invalidate
    from proxy.models import Deployment

    upstream = upstream_make(name="fake", base_url=fake_upstream.base_url, api_key="sk-upstream-secret-0123456789")
    Deployment.objects.filter(model__name="demo").update(upstream=upstream)
    catalog_invalidate()
    return fake_upstream


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_body_nested_deeper_than_can_be_forwarded_is_400_before_reaching_the_upstream(
    via, on_fake_upstream, demo, usage, stream
):
    answer = via.request("POST", "/v1/chat/completions", body=deep_chat(DEEP, stream=stream), headers=bearer(demo))
    assert_openai_error(answer, 400, "body_too_deep")
    assert on_fake_upstream.requests == []
    [record] = usage.flushed()
    assert (record.status, record.error_code) == (400, "body_too_deep")


def test_deep_body_is_400_on_the_mock_upstream_too_and_the_deepest_encodable_one_is_served(via, demo):
    assert_openai_error(
        via.request("POST", "/v1/chat/completions", body=deep_chat(DEEP), headers=bearer(demo)), 400, "body_too_deep"
    )
    # Two levels (the body object and the messages array) plus the message object sit above the content.
    answer = via.request("POST", "/v1/chat/completions", body=deep_chat(254 - 3), headers=bearer(demo))
    assert answer.status == 200, answer.body


# One test each, looping over the cases: every case through both paths, without a live server per case.
BAD_PROMPTS = [5, True, 1.5, {}, [], [True], [1.5], ["a", 1], [1, "a"], [[1, "a"]], [[]], [[True]]]
GOOD_PROMPTS = ["hi there", "", ["a", "b"], [1, 2, 3], [[1, 2], [3]]]


def test_completions_prompt_of_a_type_openai_refuses_is_400_naming_prompt(via, demo):
    for stream in (False, True):
        for prompt in BAD_PROMPTS:
            body = orjson.dumps({"model": "demo", "prompt": prompt, "stream": stream})
            answer = via.request("POST", "/v1/completions", body=body, headers=bearer(demo))
            error = assert_openai_error(answer, 400, "invalid_prompt")
            assert error["param"] == "prompt", (prompt, stream)


def test_completions_accept_every_prompt_shape_openai_does(via, demo):
    for stream in (False, True):
        for prompt in GOOD_PROMPTS:
            body = orjson.dumps({"model": "demo", "prompt": prompt, "stream": stream})
            answer = via.request("POST", "/v1/completions", body=body, headers=bearer(demo))
            assert answer.status == 200, (prompt, stream, answer.body)
            if stream:
                assert answer.body.endswith(b"data: [DONE]\n\n")
            else:
                assert answer.json()["choices"][0]["text"].startswith("echo:")


WRONG_TYPES = [
    ("/v1/chat/completions", {"model": ""}, "model"),
    ("/v1/chat/completions", {"model": ["demo"]}, "model"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [1]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, "hi"]}, "messages"),
    ("/v1/chat/completions", {"stream": 1}, "stream"),
    ("/v1/chat/completions", {"stream_options": "usage"}, "stream_options"),
    ("/v1/chat/completions", {"stream_options": [True]}, "stream_options"),
    ("/v1/chat/completions", {"max_tokens": "5"}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": 1.5}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"n": 2.0}, "n"),
    ("/v1/chat/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"temperature": True}, "temperature"),
    ("/v1/chat/completions", {"top_p": [1]}, "top_p"),
    ("/v1/completions", {"max_tokens": "16"}, "max_tokens"),
    ("/v1/embeddings", {"input": {"text": "hi"}}, "input"),
    ("/v1/embeddings", {"input": [True]}, "input"),
    ("/v1/embeddings", {"input": 3}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
]
BASE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "demo", "prompt": "hi"},
    "/v1/embeddings": {"model": "demo", "input": "hi"},
}


def test_fields_of_the_wrong_type_are_400_naming_the_field(via, demo):
    for path, fields, param in WRONG_TYPES:
        answer = via.request("POST", path, body=orjson.dumps({**BASE_BODIES[path], **fields}), headers=bearer(demo))
        assert answer.status == 400, (path, fields, answer.body)
        error = answer.json()["error"]
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), (path, fields)


def test_optional_fields_of_the_right_type_or_null_are_accepted(via, demo):
    body = orjson.dumps(
        {
            "model": "demo",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "n": 1,
            "temperature": 0,
            "top_p": 0.5,
            "stream": None,
            "stream_options": None,
        }
    )
    assert via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo)).status == 200
    for value in (["a", "b"], [1, 2], [[1], [2, 3]]):
        body = orjson.dumps({"model": "demo", "input": value})
        assert via.request("POST", "/v1/embeddings", body=body, headers=bearer(demo)).status == 200


def _error_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.expect_error_log
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_unexpected_exception_is_an_openai_shaped_500_logged_once_with_a_usage_record(
    via, demo, usage, monkeypatch, caplog, stream
):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the mock")

    monkeypatch.setattr("proxy.edge.backends.mock_answer", broken)
    monkeypatch.setattr("proxy.mock_backend.mock_answer", broken)
    body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    answer = via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo))
    error = assert_openai_error(answer, 500, "internal_error")
    assert error["type"] == "server_error"
    assert "bug" not in error["message"], "no internals in the answer"
    [record] = usage.flushed()
    assert (record.status, record.error_code) == (500, "internal_error")
    [line] = _error_lines(caplog)
    assert line.exc_info is not None
    assert line.exc_info[0] is RuntimeError


@pytest.mark.expect_error_log
def test_unexpected_exception_mid_stream_ends_it_with_an_error_event_not_a_dropped_connection(
    via, demo, usage, monkeypatch, caplog
):
    async def broken_events(*args: Any, **kwargs: Any) -> Any:
        yield b'data: {"choices":[]}\n\n'
        raise RuntimeError("a bug mid-stream")

    monkeypatch.setattr("proxy.mock_backend._events", broken_events)
    answer = via.request("POST", "/v1/chat/completions", body=deep_chat(1, stream=True), headers=bearer(demo))
    assert answer.status == 200
    last = [e for e in answer.body.split(b"\n\n") if e][-1]
    assert orjson.loads(last[6:])["error"]["code"] == "internal_error"
    [record] = usage.flushed()
    assert (record.status, record.error_code) == (500, "internal_error")
    assert len(_error_lines(caplog)) == 1


def test_error_messages_never_echo_the_presented_key(via, demo):
    secret = demo.secret
    for body in (
        orjson.dumps({"model": secret, "messages": [{"role": "user", "content": "hi"}]}),
        orjson.dumps({"model": f"x{secret}x", "messages": [{"role": "user", "content": "hi"}]}),
    ):
        answer = via.request("POST", "/v1/chat/completions", body=body, headers=bearer(demo))
        assert answer.status == 404
        assert secret.encode() not in answer.body
    answer = via.request("GET", f"/v1/models/{secret}", headers=bearer(demo))
    assert answer.status == 404
    assert secret.encode() not in answer.body
    wrong = secret[:-4] + "zzzz"
    answer = via.request("POST", "/v1/chat/completions", body=CHAT, headers={"Authorization": f"Bearer {wrong}"})
    assert answer.status == 401
    assert wrong.encode() not in answer.body


def test_upstream_error_quoting_our_upstream_credential_does_not_reach_the_client(via, on_fake_upstream, demo):
    quoted = "Incorrect API key provided: sk-upstream-secret-0123456789. Check your key."
    on_fake_upstream.fail_next(1, status=400, body={"error": {"message": quoted, "type": "x", "code": None}})
    answer = via.request("POST", "/v1/chat/completions", body=CHAT, headers=bearer(demo))
    error = assert_openai_error(answer, 400, "upstream_refused")
    assert b"sk-upstream-secret" not in answer.body
    assert error["message"].startswith("Incorrect API key provided: ***")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"is_active": False}, "api_key_disabled"),
        ({"is_active": False, "revoked_at": timezone.now()}, "api_key_revoked"),
        ({"ip_allowlist": ["10.0.0.0/8"]}, "ip_not_allowed"),
    ],
)
def test_a_known_keys_refused_call_is_in_its_request_log_but_is_no_use_of_it(
    live_gateway, demo, usage, fields, code
) -> None:
    key = key_make(**fields)
    transport = LeanTransport(live_gateway.base_url)
    nope = {"Authorization": "Bearer afk-" + "x" * 43}

    assert_openai_error(transport.request("POST", "/v1/chat/completions", body=CHAT, headers=bearer(key)), 403, code)
    assert_openai_error(
        transport.request("POST", "/v1/chat/completions", body=CHAT, headers=nope), 401, "invalid_api_key"
    )

    refused, unknown = sorted(usage.flushed(), key=lambda record: record.status, reverse=True)
    assert (refused.status, refused.error_code) == (403, code)
    assert (refused.key_id, refused.key_prefix, refused.user_id) == (key.pk, key.prefix, key.owner_id)
    assert (unknown.key_id, unknown.key_prefix, unknown.user_id) == (None, "", None)  # whose? nobody's
    key.refresh_from_db()
    assert key.last_used_at is None  # refused: not a use of the key
