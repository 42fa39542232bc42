"""Every proxy refusal, OpenAI-shaped, through both front doors: the lean ASGI path and Django's views.

``via`` runs each test twice: against a live gateway (``apiforge.asgi`` dispatching ``/v1/`` to the
lean app) and through Django's test client (``proxy/views.py`` behind Django's request cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.utils import timezone

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
        self.client = Client()

    def request(self, method, path, *, body=b"", headers=None):
        response = self.client.generic(method, path, data=body, content_type="application/json", headers=headers or {})
        content = async_to_sync(_collect)(response.streaming_content) if response.streaming else response.content
        return Answer(response.status_code, {k.lower(): v for k, v in response.items()}, content)


async def _collect(chunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


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
        (orjson.dumps({"model": "demo", "messages": []}), "missing_messages", "messages"),
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


def test_unknown_path_is_404_and_wrong_method_405(via, demo):
    assert_openai_error(via.request("POST", "/v1/nothing-here", body=CHAT, headers=bearer(demo)), 404, "unknown_url")
    assert_openai_error(via.request("GET", "/v1/chat/completions", headers=bearer(demo)), 405, "method_not_allowed")
    assert_openai_error(via.request("POST", "/v1/models", headers=bearer(demo)), 405, "method_not_allowed")


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
