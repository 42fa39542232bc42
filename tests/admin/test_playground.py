"""The admin Playground: pick a usable key and one of its models, get a short-lived playground token for it from
the admin, and call the real proxy with it (streamed answer, tokens, and the cost the ledger recorded).

The page and the token endpoint are tested through Django's client; the token against the real application
under uvicorn (``live_gateway``) with the official ``openai`` client and a fake upstream.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from django.core import signing
from django.test import Client
from django.utils import timezone

from accounts.models import User
from gateway_stats.models import AuditEvent, UsageRecord
from gateway_stats.usage import emitter
from keys.playground import PLAYGROUND_TOKEN_PREFIX, PLAYGROUND_TOKEN_SALT
from keys.services import key_revoke
from proxy.models import Model
from tests.factories import ApiKeyFactory, UserFactory
from tests.live_server import LiveServer, live_gateway, live_server_factory
from tests.proxy.conftest import fake_upstream
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import model_make, upstream_make, usage_flush

__all__ = ["fake_upstream", "live_gateway", "live_server_factory"]

PAGE = "/admin/playground/"
TOKEN = "/admin/playground/token/"
USAGE = "/admin/playground/usage/"
MESSAGES = [{"role": "user", "content": "hello from the playground"}]


def _key_models(html: str) -> dict[str, list[str]]:
    found = re.search(r'<script id="playground-key-models" type="application/json">(.*?)</script>', html, re.S)
    assert found is not None, "the page embeds no key -> models map"
    return dict(json.loads(found[1]))


def _options(html: str, select_id: str) -> dict[str, str]:
    select = re.search(rf'<select id="{select_id}"[^>]*>(.*?)</select>', html, re.S)
    assert select is not None, f"no #{select_id}"
    return {value: label.strip() for value, label in re.findall(r'<option value="([^"]*)">([^<]*)</option>', select[1])}


def _token(client: Client, key_id: int) -> str:
    answer = client.post(TOKEN, {"key": str(key_id)})
    assert answer.status_code == 200, answer.content
    token: str = answer.json()["token"]
    return token


# --- the page ---


@pytest.mark.django_db
def test_the_page_lists_only_the_keys_a_call_would_be_accepted_with_and_each_keys_models(
    admin_for: Callable[[User], Client], root: User
) -> None:
    upstream = upstream_make(base_url="http://127.0.0.1:9/v1")
    for name in ("gpt-b", "gpt-a"):
        model_make(name, upstream)
    Model.objects.filter(pk=model_make("gpt-off", upstream).pk).update(is_active=False)
    alice = UserFactory(username="alice")
    usable = ApiKeyFactory(name="alice-main", owner=alice)
    scoped = ApiKeyFactory(name="alice-scoped", owner=alice, allowed_models=["gpt-b", "gpt-off"])
    now = timezone.now()
    ApiKeyFactory(name="disabled", owner=alice, is_active=False)
    ApiKeyFactory(name="revoked", owner=alice, is_active=False, revoked_at=now)
    ApiKeyFactory(name="expired", owner=alice, expires_at=now - timedelta(minutes=1))
    ApiKeyFactory(name="owner-gone", owner=UserFactory(is_active=False))

    response = admin_for(root).get(PAGE)

    html = response.content.decode()
    assert response.status_code == 200
    options = _options(html, "playground-key")
    assert set(options) == {str(usable.pk), str(scoped.pk)}
    assert options[str(usable.pk)] == f"alice-main ({usable.prefix}…, alice)"
    assert _key_models(html) == {str(usable.pk): ["gpt-a", "gpt-b"], str(scoped.pk): ["gpt-b"]}
    for element in ("playground-model", "playground-message", "playground-send", "playground-answer"):
        assert f'id="{element}"' in html
    assert 'id="playground-usage"' in html
    assert 'id="playground-error"' in html
    assert "proxy/playground.js" in html
    assert "<script>" not in html.split('id="playground"', 1)[1], "no inline script (CSP)"
    assert 'name="csrfmiddlewaretoken"' in html
    assert "Playground" in html  # the title and the sidebar's entry


@pytest.mark.django_db
def test_staff_without_the_keys_view_permission_see_only_their_own_usable_keys(
    admin_for: Callable[[User], Client],
) -> None:
    staff = UserFactory(staff=True)
    own = ApiKeyFactory(owner=staff)
    ApiKeyFactory()  # someone else's

    html = admin_for(staff).get(PAGE).content.decode()

    assert set(_options(html, "playground-key")) == {str(own.pk)}


@pytest.mark.django_db
def test_a_user_without_a_usable_key_is_told_so(admin_for: Callable[[User], Client]) -> None:
    html = admin_for(UserFactory(staff=True)).get(PAGE).content.decode()

    assert 'id="playground-no-keys"' in html
    assert 'id="playground-send"' not in html


def test_the_playground_script_is_a_static_file_that_streams_from_the_proxy() -> None:
    from django.contrib.staticfiles import finders

    path = finders.find("proxy/playground.js")
    assert path is not None
    script = open(path, encoding="utf-8").read()
    assert "getReader()" in script
    assert '"Bearer "' in script
    assert "include_usage: true" in script
    assert "X-CSRFToken" in script


# --- the token endpoint ---


@pytest.mark.django_db
def test_the_token_endpoint_refuses_anonymous_and_non_staff_users_and_get() -> None:
    key = ApiKeyFactory()
    anonymous = Client().post(TOKEN, {"key": str(key.pk)})
    not_staff = Client()
    not_staff.force_login(key.owner)
    staff = Client()
    staff.force_login(UserFactory(superuser=True))

    for refused in (anonymous, not_staff.post(TOKEN, {"key": str(key.pk)})):
        assert refused.status_code == 302
        assert refused["Location"].startswith("/admin/login/")
    assert staff.get(TOKEN, {"key": str(key.pk)}).status_code == 405
    assert not AuditEvent.objects.filter(action="key.playground").exists()


@pytest.mark.django_db
def test_the_token_endpoint_needs_the_pages_csrf_token() -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(UserFactory(superuser=True))
    key = ApiKeyFactory()

    assert client.post(TOKEN, {"key": str(key.pk)}).status_code == 403
    page = client.get(PAGE).content.decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert csrf is not None
    answer = client.post(TOKEN, {"key": str(key.pk)}, headers={"X-CSRFToken": csrf[1]})
    assert answer.status_code == 200


@pytest.mark.django_db
def test_a_token_is_issued_for_a_usable_key_and_audited_without_the_token(
    admin_for: Callable[[User], Client], root: User
) -> None:
    key = ApiKeyFactory(name="tried")

    answer = admin_for(root).post(TOKEN, {"key": str(key.pk)}, REMOTE_ADDR="10.1.2.3")

    assert answer.status_code == 200
    body = answer.json()
    assert body["token"].startswith(PLAYGROUND_TOKEN_PREFIX)
    assert body["expires_in"] == 300
    event = AuditEvent.objects.get(action="key.playground")
    assert (event.actor, event.object_type, event.object_id) == (root, "keys.apikey", str(key.pk))
    assert event.object_repr == str(key)
    assert event.ip_address == "10.1.2.3"
    stored = json.dumps([event.changes, event.object_repr])
    assert body["token"] not in stored
    assert body["token"].removeprefix(PLAYGROUND_TOKEN_PREFIX) not in stored
    again = _token(admin_for(root), key.pk)
    assert again != body["token"], "each token is new, even for the same key within a second"
    assert AuditEvent.objects.filter(action="key.playground").count() == 2


@pytest.mark.django_db
@pytest.mark.parametrize("which", ["revoked", "disabled", "expired", "someone else's", "unknown", "not a number"])
def test_no_token_for_a_key_the_user_may_not_use(admin_for: Callable[[User], Client], which: str) -> None:
    staff = UserFactory(staff=True)
    now = timezone.now()
    keys = {
        "revoked": lambda: ApiKeyFactory(owner=staff, is_active=False, revoked_at=now).pk,
        "disabled": lambda: ApiKeyFactory(owner=staff, is_active=False).pk,
        "expired": lambda: ApiKeyFactory(owner=staff, expires_at=now - timedelta(seconds=1)).pk,
        "someone else's": lambda: ApiKeyFactory().pk,
        "unknown": lambda: 987654,
        "not a number": lambda: "1 or 1=1",
    }

    answer = admin_for(staff).post(TOKEN, {"key": str(keys[which]())})

    assert answer.status_code == 404
    assert "may not use it" in answer.json()["detail"]
    assert not AuditEvent.objects.filter(action="key.playground").exists()


# --- the token against the real proxy ---


@pytest.fixture
def gateway(live_gateway: LiveServer, fake_upstream: FakeUpstream, settings: Any) -> Iterator[LiveServer]:
    settings.USAGE_TRANSPORT = "database"  # the embedded default: the usage thread writes the ledger itself
    upstream = upstream_make(name="pg-upstream", base_url=fake_upstream.base_url, timeout_s=5, max_retries=0)
    model_make("gpt-play", upstream, upstream_model="fake-chat", input_price="0.5", output_price="1.5")
    model_make("gpt-other", upstream, upstream_model="fake-chat")
    yield live_gateway
    emitter.discard()


def _logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _chat(gateway: LiveServer, bearer: str, model: str = "gpt-play") -> httpx.Response:
    return httpx.post(
        gateway.url("/v1/chat/completions"),
        headers={"Authorization": f"Bearer {bearer}"},
        json={"model": model, "messages": MESSAGES},
        timeout=10,
    )


def _error(answer: httpx.Response) -> tuple[int, str, str]:
    error = answer.json()["error"]
    return answer.status_code, error["code"], error["message"]


def test_a_playground_token_streams_an_answer_through_the_proxy_as_its_key_and_the_ledger_has_the_cost(
    gateway: LiveServer, fake_upstream: FakeUpstream
) -> None:
    root = UserFactory(superuser=True)
    key = ApiKeyFactory(name="someone's")
    admin = _logged_in(root)
    token = _token(admin, key.pk)

    with openai.OpenAI(base_url=gateway.url("/v1"), api_key=token, max_retries=0, timeout=10) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-play",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        request_id = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    usage_flush()

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == FakeUpstream.expected_content(MESSAGES)
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.total_tokens == FakeUpstream.expected_usage(MESSAGES)["total_tokens"]
    row = UsageRecord.objects.get(request_id=request_id)
    assert (row.key_id, row.user_id, row.key_prefix, row.model, row.status) == (
        key.pk,
        key.owner_id,
        key.prefix,
        "gpt-play",
        200,
    )
    assert row.cost > 0
    assert token not in fake_upstream.requests[-1].headers.get("authorization", "")

    recorded = admin.get(USAGE, {"request_id": request_id})
    assert recorded.status_code == 200
    body = recorded.json()
    assert (body["prompt_tokens"], body["completion_tokens"], body["total_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    assert Decimal(body["cost"]) == row.cost


def test_the_usage_endpoint_answers_404_for_an_unknown_call_or_a_key_the_user_may_not_see(
    gateway: LiveServer,
) -> None:
    key = ApiKeyFactory()
    answer = _chat(gateway, key.secret)
    usage_flush()
    request_id = answer.headers["x-request-id"]
    staff = _logged_in(UserFactory(staff=True))

    assert staff.get(USAGE, {"request_id": request_id}).status_code == 404
    assert staff.get(USAGE, {"request_id": "no-such-call"}).json()["code"] == "usage_not_found"
    assert _logged_in(key.owner).get(USAGE, {"request_id": request_id}).status_code == 302  # not staff
    owner_as_staff = key.owner
    User.objects.filter(pk=owner_as_staff.pk).update(is_staff=True)
    assert _logged_in(owner_as_staff).get(USAGE, {"request_id": request_id}).status_code == 200


class _SignedLongAgo(signing.TimestampSigner):
    def timestamp(self) -> str:
        return signing.b62_encode(int(time.time()) - 6 * 60)


def test_an_expired_or_tampered_token_is_an_invalid_key_saying_so(gateway: LiveServer) -> None:
    key = ApiKeyFactory()
    expired = PLAYGROUND_TOKEN_PREFIX + _SignedLongAgo(salt=PLAYGROUND_TOKEN_SALT).sign(f"{key.pk}.nonce")
    good = _token(_logged_in(UserFactory(superuser=True)), key.pk)
    other_key = ApiKeyFactory()
    value, stamp, signature = good.removeprefix(PLAYGROUND_TOKEN_PREFIX).split(":")
    tampered = f"{PLAYGROUND_TOKEN_PREFIX}{other_key.pk}.{value.partition('.')[2]}:{stamp}:{signature}"
    forged = PLAYGROUND_TOKEN_PREFIX + signing.TimestampSigner(key="not the server's", salt=PLAYGROUND_TOKEN_SALT).sign(
        f"{key.pk}.nonce"
    )

    status, code, message = _error(_chat(gateway, expired))
    assert (status, code) == (401, "invalid_api_key")
    assert "playground token has expired" in message
    for bad in (tampered, forged, PLAYGROUND_TOKEN_PREFIX + "garbage"):
        status, code, message = _error(_chat(gateway, bad))
        assert (status, code) == (401, "invalid_api_key")
        assert "playground token is invalid" in message
    assert _chat(gateway, good).status_code == 200


def test_a_token_for_a_key_revoked_since_is_refused_like_the_key(gateway: LiveServer) -> None:
    key = ApiKeyFactory()
    token = _token(_logged_in(UserFactory(superuser=True)), key.pk)
    assert _chat(gateway, token).status_code == 200  # cached by the proxy now

    key_revoke(key=key)

    status, code, message = _error(_chat(gateway, token))
    assert (status, code, message) == (403, "api_key_revoked", "This API key has been revoked.")
    assert _error(_chat(gateway, key.secret))[:2] == (403, "api_key_revoked")


def test_the_keys_model_scopes_and_budget_apply_to_its_token(gateway: LiveServer) -> None:
    root = _logged_in(UserFactory(superuser=True))
    scoped = ApiKeyFactory(allowed_models=["gpt-play"])
    broke = ApiKeyFactory(budget_tokens=1)

    status, code, _ = _error(_chat(gateway, _token(root, scoped.pk), model="gpt-other"))
    assert (status, code) == (403, "model_not_allowed")
    assert _chat(gateway, _token(root, scoped.pk), model="gpt-play").status_code == 200
    assert _chat(gateway, broke.secret).status_code == 200  # admitted with budget left; spends it all
    time.sleep(0.2)  # the settling runs off the answer's path
    refused = _chat(gateway, _token(root, broke.pk))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert "budget" in refused.json()["error"]["message"]


def test_real_keys_and_unknown_keys_answer_as_before(gateway: LiveServer) -> None:
    key = ApiKeyFactory()

    assert _chat(gateway, key.secret).status_code == 200
    assert _error(_chat(gateway, "afk-" + "x" * 43)) == (401, "invalid_api_key", "Incorrect API key provided.")
    assert _error(_chat(gateway, "afpg-not-ours"))[2] == "Incorrect API key provided."
