"""Forwarding under /gw/: matching, versions, auth modes, transforms, errors, retries, fallback, accounting."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest
from django.utils import timezone
from rest_framework_simplejwt.tokens import RefreshToken

from gateway_stats.usage import emitter
from tests.factories import ApiKeyFactory, UserFactory
from tests.gateway.conftest import RouteMaker
from tests.gateway.echo_target import EchoTarget
from tests.live_server import LiveServer
from tests.proxy.helpers import usage_flush


def _get(gateway: LiveServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(gateway.url(path), timeout=10, **kwargs)


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_a_request_reaches_the_target_with_the_prefix_stripped_and_the_query_kept(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("orders", "/orders", [echo.root_url])
    response = _get(live_gateway, "/gw/orders/42/items?color=red&size=2", headers={"x-request-id": "req-gw-1"})
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/42/items"
    assert seen["query"] == "color=red&size=2"
    assert seen["headers"]["x-request-id"] == "req-gw-1"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["headers"]["x-forwarded-proto"] == "http"
    assert seen["headers"]["x-forwarded-host"] == f"127.0.0.1:{live_gateway.port}"
    assert response.headers["x-request-id"] == "req-gw-1"


def test_the_route_prefix_is_kept_without_strip_path_and_the_base_path_is_prepended(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("orders", "/orders", [echo.root_url + "/base/"], strip_path=False)
    assert _get(live_gateway, "/gw/orders/7").json()["path"] == "/base/orders/7"
    assert _get(live_gateway, "/gw/orders").json()["path"] == "/base/orders"


def test_path_rewrites_by_template_and_by_regex(
    live_gateway: LiveServer, target_factory: Any, route_make: RouteMaker
) -> None:
    target = target_factory("t")
    route_make("tpl", "/tpl", [target.root_url], path_rewrite={"template": "/api/v3/{path}"})
    route_make(
        "rx",
        "/rx",
        [target.root_url],
        path_rewrite={"regex": r"^/items/(\d+)$", "replacement": r"/item/\1/detail"},
    )
    assert _get(live_gateway, "/gw/tpl/users/1").json()["path"] == "/api/v3/users/1"
    assert _get(live_gateway, "/gw/rx/items/55").json()["path"] == "/item/55/detail"
    assert _get(live_gateway, "/gw/rx/other").json()["path"] == "/other"  # no match: unchanged


def test_the_longest_prefix_wins_and_a_prefix_matches_whole_segments_only(
    live_gateway: LiveServer, target_factory: Any, route_make: RouteMaker
) -> None:
    short, long = target_factory("short"), target_factory("long")
    route_make("api", "/shop", [short.root_url])
    route_make("api-cart", "/shop/cart", [long.root_url])
    assert _get(live_gateway, "/gw/shop/cart/1").json()["target"] == "long"
    assert _get(live_gateway, "/gw/shop/cartoon").json()["target"] == "short"
    assert _get(live_gateway, "/gw/shop").json()["target"] == "short"
    missing = _get(live_gateway, "/gw/shopping")
    assert missing.status_code == 404
    assert _error(missing)["code"] == "route_not_found"


def test_a_wrong_method_is_405_with_allow(live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker) -> None:
    route_make("ro", "/ro", [echo.root_url], methods=["GET", "HEAD"])
    response = httpx.post(live_gateway.url("/gw/ro/x"), content=b"{}", timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert _error(response)["code"] == "method_not_allowed"
    assert echo.calls == 0


def test_hosts_pick_the_route_bound_to_the_request_host(
    live_gateway: LiveServer, target_factory: Any, route_make: RouteMaker
) -> None:
    generic, bound = target_factory("generic"), target_factory("bound")
    route_make("any-host", "/svc", [generic.root_url])
    route_make("one-host", "/svc", [bound.root_url], hosts=["api.example.test"])
    assert _get(live_gateway, "/gw/svc/x", headers={"host": "api.example.test"}).json()["target"] == "bound"
    assert _get(live_gateway, "/gw/svc/x", headers={"host": "other.example.test"}).json()["target"] == "generic"


def test_versions_by_path_segment_or_header_and_deprecation_headers(
    live_gateway: LiveServer, target_factory: Any, route_make: RouteMaker
) -> None:
    v1, v2 = target_factory("v1"), target_factory("v2")
    sunset = timezone.now().replace(microsecond=0) + dt.timedelta(days=30)
    route_make("orders-v1", "/orders", [v1.root_url], version="v1", deprecated=True, sunset_at=sunset)
    route_make("orders-v2", "/orders", [v2.root_url], version="v2")
    old = _get(live_gateway, "/gw/v1/orders/3")
    assert old.json()["target"] == "v1"
    assert old.json()["path"] == "/3"
    assert old.headers["deprecation"] == "true"
    assert dt.datetime.strptime(old.headers["sunset"], "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=dt.UTC) == sunset
    new = _get(live_gateway, "/gw/v2/orders/3")
    assert new.json()["target"] == "v2"
    assert "deprecation" not in new.headers
    by_header = _get(live_gateway, "/gw/orders/3", headers={"x-api-version": "v2"})
    assert by_header.json()["target"] == "v2"
    assert _get(live_gateway, "/gw/v3/orders/3").status_code == 404
    assert _get(live_gateway, "/gw/orders/3").status_code == 404  # no version given, none unversioned


def test_key_auth_refuses_a_missing_unknown_or_unscoped_key_and_never_forwards_it(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("private", "/private", [echo.root_url], auth="key")
    allowed = ApiKeyFactory(allowed_routes=["private"])
    other = ApiKeyFactory(allowed_routes=["elsewhere"])
    assert _error(_get(live_gateway, "/gw/private/x"))["code"] == "missing_api_key"
    unknown = _get(live_gateway, "/gw/private/x", headers={"authorization": "Bearer sk-nope-not-a-key"})
    assert unknown.status_code == 401
    refused = _get(live_gateway, "/gw/private/x", headers={"x-api-key": other.secret})
    assert refused.status_code == 403
    assert _error(refused)["code"] == "route_not_allowed"
    assert echo.calls == 0
    ok = _get(live_gateway, "/gw/private/x", headers={"authorization": f"Bearer {allowed.secret}"})
    assert ok.status_code == 200
    forwarded = ok.json()["headers"]
    assert "authorization" not in forwarded
    assert allowed.secret not in str(forwarded)


def test_jwt_auth_forwards_the_user_and_never_the_token(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("jwt", "/jwt", [echo.root_url], auth="jwt")
    user = UserFactory(username="ada")
    refresh = RefreshToken.for_user(user)
    access = str(refresh.access_token)
    response = _get(
        live_gateway,
        "/gw/jwt/me",
        headers={"authorization": f"Bearer {access}", "x-authenticated-user": "mallory"},
    )
    assert response.status_code == 200
    forwarded = response.json()["headers"]
    assert forwarded["x-authenticated-user"] == "ada"
    assert forwarded["x-authenticated-user-id"] == str(user.pk)
    assert "authorization" not in forwarded
    assert access not in str(forwarded)
    for bad in (str(refresh), access[:-4] + "abcd", "not-a-jwt"):
        answer = _get(live_gateway, "/gw/jwt/me", headers={"authorization": f"Bearer {bad}"})
        assert answer.status_code == 401, bad
    assert _error(_get(live_gateway, "/gw/jwt/me"))["code"] == "missing_token"
    assert echo.calls == 1


def test_a_public_route_passes_client_credentials_but_never_one_of_our_keys(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("public", "/public", [echo.root_url], auth="none")
    key = ApiKeyFactory()
    theirs = _get(live_gateway, "/gw/public/x", headers={"authorization": "Bearer their-own-token"})
    assert theirs.json()["headers"]["authorization"] == "Bearer their-own-token"
    ours = _get(live_gateway, "/gw/public/x", headers={"authorization": f"Bearer {key.secret}"})
    assert "authorization" not in ours.json()["headers"]


def test_request_and_response_header_transforms(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    echo.extra_headers = {"x-powered-by": "secret-stack", "x-keep": "1"}
    route_make(
        "tx",
        "/tx",
        [echo.root_url],
        request_headers={"add": {"x-added": "yes"}, "set": {"x-tenant": "acme"}, "remove": ["x-drop-me"]},
        response_headers={"add": {"x-gateway": "apiforge"}, "set": {"x-keep": "2"}, "remove": ["x-powered-by"]},
    )
    response = _get(live_gateway, "/gw/tx/h", headers={"x-drop-me": "1", "x-tenant": "spoofed", "x-other": "o"})
    forwarded = response.json()["headers"]
    assert forwarded["x-added"] == "yes"
    assert forwarded["x-tenant"] == "acme"
    assert "x-drop-me" not in forwarded
    assert forwarded["x-other"] == "o"
    assert response.headers["x-gateway"] == "apiforge"
    assert response.headers["x-keep"] == "2"
    assert "x-powered-by" not in response.headers


def test_hop_by_hop_headers_are_dropped_both_ways(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("hop", "/hop", [echo.root_url])
    response = _get(live_gateway, "/gw/hop/x", headers={"te": "trailers", "x-keep": "1", "connection": "x-keep"})
    forwarded = response.json()["headers"]
    assert "te" not in forwarded
    assert forwarded.get("connection", "keep-alive").lower() in {"keep-alive", "close"}


def test_a_failed_idempotent_call_is_retried_on_another_target_but_a_post_is_not(
    live_gateway: LiveServer, target_factory: Any, route_make: RouteMaker
) -> None:
    first, second = target_factory("first"), target_factory("second")
    route_make("retry", "/retry", [first.root_url, second.root_url], retries=1, breaker_failure_threshold=100)
    first.fail_next(10, status=503)
    second.fail_next(10, status=503)
    second.reset()
    answers = [_get(live_gateway, "/gw/retry/x").json()["target"] for _ in range(4)]
    assert answers == ["second"] * 4
    posted = [httpx.post(live_gateway.url("/gw/retry/x"), content=b"{}", timeout=10).status_code for _ in range(4)]
    assert sorted(posted) == [200, 200, 503, 503]  # round-robin: half the POSTs land on the failing target


def test_no_reachable_target_is_502_and_the_fallback_answers_when_set(
    live_gateway: LiveServer, route_make: RouteMaker
) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    route_make("dead", "/dead", [dead], retries=0)
    route_make(
        "degraded",
        "/degraded",
        [dead],
        retries=0,
        fallback={"status": 200, "body": {"items": [], "degraded": True}, "headers": {"x-fallback": "1"}},
    )
    down = _get(live_gateway, "/gw/dead/x")
    assert down.status_code == 502
    assert _error(down)["code"] == "upstream_unreachable"
    served = _get(live_gateway, "/gw/degraded/x")
    assert served.status_code == 200
    assert served.json() == {"items": [], "degraded": True}
    assert served.headers["x-fallback"] == "1"


def test_a_drained_only_route_answers_503_with_retry_after(live_gateway: LiveServer, route_make: RouteMaker) -> None:
    route_make("drained", "/drained", [("http://127.0.0.1:9", 1, "drained")])
    response = _get(live_gateway, "/gw/drained/x")
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert _error(response)["code"] == "no_healthy_upstream"


def test_an_expired_lease_stops_serving_at_once(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make(
        "leased", "/leased", [echo.root_url], ttl_s=30, lease_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    response = _get(live_gateway, "/gw/leased/x")
    assert response.status_code == 404
    assert echo.calls == 0


def test_body_limit_of_a_route(live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker) -> None:
    route_make("small", "/small", [echo.root_url], max_body_bytes=100)
    assert httpx.post(live_gateway.url("/gw/small/x"), content=b"x" * 100, timeout=10).json()["body_len"] == 100
    too_big = httpx.post(live_gateway.url("/gw/small/x"), content=b"x" * 101, timeout=10)
    assert too_big.status_code == 413
    assert _error(too_big)["code"] == "request_too_large"
    assert echo.calls == 1  # a declared length over the limit never reaches the target

    def chunks() -> Any:
        for _ in range(10):
            yield b"y" * 50

    # A chunked body is streamed as it comes: the target may see the start of it before the gateway cuts it off.
    chunked = httpx.post(live_gateway.url("/gw/small/upload"), content=chunks(), timeout=10)
    assert chunked.status_code == 413


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_methods_and_bodies_pass_unchanged(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker, method: str
) -> None:
    route_make("any", "/any", [echo.root_url])
    body = b'{"hello": "world"}' if method not in {"GET", "DELETE"} else b""
    response = httpx.request(method, live_gateway.url("/gw/any/thing"), content=body, timeout=10)
    assert response.json()["method"] == method
    assert response.json()["body"] == body.decode()


def test_every_call_is_accounted_with_its_route_and_target(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    from tests.proxy.helpers import UsageCapture

    route_make("acct", "/acct", [echo.root_url], auth="key")
    key = ApiKeyFactory()
    capture = UsageCapture()
    emitter.sinks.append(capture)
    try:
        httpx.post(live_gateway.url("/gw/acct/x"), content=b"12345", headers={"x-api-key": key.secret}, timeout=10)
        _get(live_gateway, "/gw/acct/x")  # 401
        _get(live_gateway, "/gw/nowhere")  # 404
        records = capture.flushed()
    finally:
        emitter.sinks.remove(capture)
    by_status = {record.status: record for record in records}
    assert set(by_status) == {200, 401, 404}
    ok = by_status[200]
    assert ok.route == "acct"
    assert ok.upstream == f"127.0.0.1:{echo.port}"
    assert ok.key_id == key.pk
    assert ok.method == "POST"
    assert ok.request_bytes == 5
    assert ok.response_bytes > 0
    assert ok.latency_ms > 0
    assert by_status[401].route == "acct"
    assert by_status[401].error_code == "missing_api_key"
    assert by_status[404].error_code == "route_not_found"


def test_a_disabled_keys_refused_route_call_is_its_own_and_never_forwarded(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    from tests.proxy.helpers import UsageCapture

    route_make("acct", "/acct", [echo.root_url], auth="key")
    key = ApiKeyFactory(is_active=False)
    capture = UsageCapture()
    emitter.sinks.append(capture)
    try:
        answer = _get(live_gateway, "/gw/acct/x", headers={"x-api-key": key.secret})
        (record,) = capture.flushed()
    finally:
        emitter.sinks.remove(capture)
    assert answer.status_code == 403
    assert _error(answer)["code"] == "api_key_disabled"
    assert echo.calls == 0
    assert (record.route, record.error_code) == ("acct", "api_key_disabled")
    assert (record.key_id, record.key_prefix, record.user_id) == (key.pk, key.prefix, key.owner_id)
    key.refresh_from_db()
    assert key.last_used_at is None


def test_gateway_calls_reach_the_ledger_and_the_route_statistics(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker, settings: Any
) -> None:
    from rest_framework.test import APIClient

    from gateway_stats.models import UsageRecord

    settings.USAGE_TRANSPORT = "database"  # the embedded default: the usage thread writes the ledger itself
    route_make("stats-route", "/stats-route", [echo.root_url])
    for _ in range(3):
        assert _get(live_gateway, "/gw/stats-route/x").status_code == 200
    echo.fail_next(1, status=500)
    assert _get(live_gateway, "/gw/stats-route/x").status_code == 500
    usage_flush()
    rows = UsageRecord.objects.filter(route="stats-route")
    assert sorted(rows.values_list("status", flat=True)) == [200, 200, 200, 500]
    assert {row.upstream for row in rows} == {f"127.0.0.1:{echo.port}"}
    assert all(row.method == "GET" and row.response_bytes > 0 for row in rows)
    staff = UserFactory(is_staff=True, is_superuser=True)
    client = APIClient()
    client.force_authenticate(staff)
    now = timezone.now()
    window = {"start": (now - dt.timedelta(hours=1)).isoformat(), "end": (now + dt.timedelta(hours=1)).isoformat()}
    answer = client.get("/api/stats/usage", {"interval": "day", "group_by": "route", **window})
    assert answer.status_code == 200, answer.content
    series = {entry["group"]: entry["points"] for entry in answer.json()["series"]}
    assert sum(point["requests"] for point in series["stats-route"]) == 4
    assert sum(point["errors"] for point in series["stats-route"]) == 1


def test_a_heartbeat_keeps_a_route_serving_past_the_lease_each_worker_loaded(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    import time

    from proxy.route_services import route_heartbeat

    ends = timezone.now() + dt.timedelta(seconds=1.0)
    renewed = route_make("beating", "/beating", [echo.root_url], ttl_s=30, lease_expires_at=ends)
    route_make("silent", "/silent", [echo.root_url], ttl_s=30, lease_expires_at=ends)
    assert _get(live_gateway, "/gw/beating/x").status_code == 200  # the worker loads both leases
    assert _get(live_gateway, "/gw/silent/x").status_code == 200
    route_heartbeat(route=renewed)  # renews in the database only: no catalog invalidation
    time.sleep(max(0.0, (ends - timezone.now()).total_seconds()) + 0.1)
    assert _get(live_gateway, "/gw/beating/x").status_code == 200
    assert _get(live_gateway, "/gw/silent/x").status_code == 404


def test_the_answer_carries_one_date_and_one_server_header(
    live_gateway: LiveServer, echo: EchoTarget, route_make: RouteMaker
) -> None:
    route_make("one", "/one", [echo.root_url])
    response = _get(live_gateway, "/gw/one/x")
    assert len(response.headers.get_list("date")) == 1
    assert response.headers.get_list("server") == ["uvicorn"]  # the target's (aiohttp) is not passed on


class _ClosingAfterOneAnswer:
    """A raw HTTP/1.1 server that answers the first request of each connection keep-alive style and closes the
    connection, unanswered, when a second request arrives on it: a target dropping an idle keep-alive
    connection just as the gateway's pool reuses it."""

    def __init__(self, body: bytes = b"ok", content_type: bytes = b"text/plain") -> None:
        import socket
        import threading

        self.answer = (
            b"HTTP/1.1 200 OK\r\ncontent-type: "
            + content_type
            + b"\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.answered = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: Any) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.answered += 1  # before the answer leaves: the client may check the count as soon as it has it
            conn.sendall(self.answer)
            if conn.recv(65536):  # the next request on this connection: dropped unanswered
                self.dropped += 1

    def close(self) -> None:
        self.sock.close()


def test_a_pooled_connection_the_target_closed_is_retried_once_even_for_a_post(
    live_gateway: LiveServer, route_make: RouteMaker
) -> None:
    from proxy.edge import breaker
    from proxy.models import Route

    target = _ClosingAfterOneAnswer()
    try:
        route_make("closing", "/closing", [f"http://127.0.0.1:{target.port}"], retries=0, breaker_failure_threshold=1)
        for _ in range(3):
            answer = httpx.post(live_gateway.url("/gw/closing/x"), content=b"payload", timeout=10)
            assert (answer.status_code, answer.text) == (200, "ok")
        assert target.answered == 3
        assert target.dropped == 2  # the second and third calls met a dropped connection first
        view = breaker.breaker_view(f"rt:{Route.objects.get(name='closing').targets.get().pk}")
        assert view.state == "closed"  # no verdict against the target (threshold 1)
    finally:
        target.close()


def test_v1_too_sends_again_once_what_met_a_dropped_keep_alive_connection(live_gateway: LiveServer) -> None:
    import json

    import openai

    from proxy.edge import breaker
    from tests.proxy.helpers import key_make, model_make, upstream_make

    completion = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    target = _ClosingAfterOneAnswer(json.dumps(completion).encode(), b"application/json")
    try:
        upstream = upstream_make(base_url=f"http://127.0.0.1:{target.port}/v1", max_retries=0)
        upstream.breaker_failure_threshold = 1
        upstream.save()
        model_make("dropping", upstream)
        client = openai.OpenAI(base_url=live_gateway.url("/v1"), api_key=key_make().secret, max_retries=0)
        for _ in range(3):
            answer = client.chat.completions.create(model="dropping", messages=[{"role": "user", "content": "x"}])
            assert answer.choices[0].message.content == "hi"
        assert (target.answered, target.dropped) == (3, 2)
        from proxy.models import Deployment

        deployment = Deployment.objects.get(model__name="dropping")
        assert breaker.breaker_view(f"dep:{deployment.pk}").state == "closed"  # no verdict (threshold 1)
    finally:
        target.close()
