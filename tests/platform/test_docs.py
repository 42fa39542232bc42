"""API documentation: /api/schema/ (valid OpenAPI 3), /docs (Swagger UI) and /redoc, with assets from the sidecar."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.test import Client
from django.urls import include, path
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.generators import SchemaGenerator
from openapi_spec_validator import validate

AUTH_PATHS = {"/auth/register", "/auth/login", "/auth/refresh", "/auth/logout", "/auth/me"}
ASSET = re.compile(r"""(?:src|href)="([^"]+)\"""")
EXTERNAL = re.compile(r"""https?://[^"'\s)]+""")


@pytest.fixture
def schema(client: Client) -> dict[str, Any]:
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return dict(json.loads(response.content))


def test_the_schema_is_served_as_yaml_by_default(client: Client) -> None:
    response = client.get("/api/schema/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi")
    assert response.content.startswith(b"openapi: 3.")


def test_the_schema_is_a_valid_openapi_3_document_with_the_auth_paths(schema: dict[str, Any]) -> None:
    validate(schema)

    assert schema["openapi"].startswith("3.")
    assert AUTH_PATHS <= set(schema["paths"])


def test_the_schema_declares_jwt_bearer_security_where_a_token_is_needed(schema: dict[str, Any]) -> None:
    assert schema["components"]["securitySchemes"]["jwtAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    paths = schema["paths"]
    assert {"jwtAuth": []} in paths["/auth/me"]["get"]["security"]
    assert paths["/auth/logout"]["post"]["security"] == [{"jwtAuth": []}]
    for public in ["/auth/register", "/auth/login", "/auth/refresh"]:
        assert paths[public]["post"].get("security", [{}]) in ([], [{}]), public


def _ref(schema: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    name = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    return dict(schema["components"]["schemas"][name])


def test_the_auth_bodies_are_documented(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    register = paths["/auth/register"]["post"]
    login = paths["/auth/login"]["post"]

    register_in = _ref(schema, register["requestBody"]["content"])
    assert set(register_in["required"]) == {"username", "email", "password"}
    assert "display_name" in register_in["properties"]
    assert "password" not in _ref(schema, register["responses"]["201"]["content"])["properties"]

    assert set(_ref(schema, login["requestBody"]["content"])["properties"]) == {"username", "password"}
    assert set(_ref(schema, login["responses"]["200"]["content"])["properties"]) == {"access", "refresh"}
    for status in ["400", "401", "429"]:
        assert set(_ref(schema, login["responses"][status]["content"])["properties"]) == {"detail", "code", "fields"}
    assert "205" in paths["/auth/logout"]["post"]["responses"]
    assert "401" in paths["/auth/refresh"]["post"]["responses"]


def test_the_auth_endpoints_generate_without_schema_warnings() -> None:
    GENERATOR_STATS.reset()
    generator = SchemaGenerator(patterns=[path("auth/", include("accounts.urls"))])

    with GENERATOR_STATS.silence():
        generator.get_schema(request=None, public=True)

    assert not GENERATOR_STATS, dict(GENERATOR_STATS._warn_cache) | dict(GENERATOR_STATS._error_cache)


@pytest.mark.parametrize(
    ("page", "bundle"),
    [
        ("/docs", "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js"),
        ("/redoc", "drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js"),
    ],
)
def test_swagger_ui_and_redoc_load_their_assets_from_the_sidecar_not_a_cdn(
    client: Client, page: str, bundle: str
) -> None:
    response = client.get(page)

    assert response.status_code == 200
    html = response.content.decode()
    assets = [url for url in ASSET.findall(html) if url.startswith(settings.STATIC_URL)]
    assert settings.STATIC_URL + bundle in assets
    for url in assets:
        assert finders.find(url.removeprefix(settings.STATIC_URL)), f"{url} is not an installed static file"
    assert not [url for url in EXTERNAL.findall(html) if "cdn" in url or "unpkg" in url or "jsdelivr" in url]
    assert "/api/schema/" in html


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def test_the_development_server_of_make_run_serves_the_docs_and_their_assets(tmp_path: Path) -> None:
    """`make run` serves under uvicorn with APP_ENV=development: /docs must work there, assets included."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "CACHE_KEY_PREFIX"}}
    env.update(APP_ENV="development", DATABASE_URL=f"sqlite:///{tmp_path / 'dev.sqlite3'}", LOG_LEVEL="WARNING")
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "apiforge.asgi:application", "--host", "127.0.0.1", "--port", str(port)],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                pytest.fail(f"the server exited: {(tmp_path / 'server.log').read_text()}")
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.1)

        for page in ["/docs", "/redoc"]:
            status, _, body = _get(base + page)
            assert status == 200
            assets = [u for u in ASSET.findall(body.decode()) if u.startswith(settings.STATIC_URL)]
            assert assets
            for url in assets:
                asset_status, content_type, content = _get(base + url)
                assert asset_status == 200, url
                assert content, url
        status, _, _ = _get(base + "/static/admin/css/base.css")
        assert status == 200
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "patch", "put", "delete"}
    ]


def test_every_operation_documents_the_error_answers_it_can_give(schema: dict[str, Any]) -> None:
    for route, method, operation in _operations(schema):
        if route.startswith(("/v1/", "/gw/")):
            continue  # the proxy's own errors: the next test
        responses = operation["responses"]
        label = f"{method.upper()} {route}"
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= set(responses), label
        if any(p["in"] == "query" for p in operation.get("parameters", [])):
            assert "400" in responses, label
        if operation.get("security", [{}]) not in ([], [{}]):
            assert "401" in responses, label
        if "{" in route:
            assert "404" in responses, label
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                assert _ref(schema, response["content"])["properties"].keys() >= {"detail", "code"}, label
    paths = schema["paths"]
    assert "403" in paths["/api/upstreams/"]["get"]["responses"]  # staff with model permissions only
    assert "403" in paths["/api/keys/"]["post"]["responses"]  # a session request without its CSRF token
    assert "403" not in paths["/auth/login"]["post"]["responses"]
    assert "WWW-Authenticate" in paths["/api/keys/"]["get"]["responses"]["401"]["headers"]


def test_the_proxy_and_the_gateway_are_documented_apart_with_api_key_security_and_openai_errors(
    schema: dict[str, Any],
) -> None:
    paths = schema["paths"]
    proxied = {route for route in paths if route.startswith(("/v1/", "/gw/"))}
    assert proxied == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{model}",
        "/gw/{path}",
    }
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["tags"] == ["OpenAI-compatible proxy"]
    assert chat["security"] == [{"apiKeyBearer": []}, {"apiKeyHeader": []}]
    assert {"application/json", "text/event-stream"} == set(chat["responses"]["200"]["content"])
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model", "messages"]
    assert {"401", "403", "429", "502", "503", "504"} <= set(chat["responses"])
    error = _ref(schema, chat["responses"]["429"]["content"])
    assert error["properties"]["error"]["required"] == ["message", "type"]
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    gateway = paths["/gw/{path}"]
    assert set(gateway) == {"get", "post", "put", "patch", "delete"}
    assert gateway["get"]["tags"] == ["Gateway routes"]
    assert {} in gateway["get"]["security"]  # a route may need no credential at all
    management_tags = {tag for route, _, op in _operations(schema) if route.startswith("/api/") for tag in op["tags"]}
    assert not management_tags & {"OpenAI-compatible proxy", "Gateway routes"}
    assert [tag["name"] for tag in schema["tags"]][-2:] == ["OpenAI-compatible proxy", "Gateway routes"]
    assert {tag["name"] for tag in schema["tags"]} >= management_tags  # every tag described
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiKeyBearer"]["scheme"] == "bearer"
    assert schemes["apiKeyHeader"] == {**schemes["apiKeyHeader"], "in": "header", "name": "x-api-key"}


def test_the_description_says_which_credential_each_part_takes(schema: dict[str, Any]) -> None:
    description = schema["info"]["description"]
    assert "`/v1/`" in description
    assert "`/gw/`" in description
    assert "JWT" in description
    assert "API key" in description


def test_validation_error_fields_are_documented_as_flat_paths_to_messages(schema: dict[str, Any]) -> None:
    fields = schema["components"]["schemas"]["ErrorResponse"]["properties"]["fields"]

    assert fields["additionalProperties"] == {"type": "array", "items": {"type": "string"}}
    assert "deployments.0.upstream" in fields["description"]


def test_request_bodies_that_refuse_unknown_fields_say_so(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]

    for strict in [
        "ApiKeyRequest",
        "PatchedApiKeyRequest",
        "KeyRotateRequest",
        "RouteDefinitionRequest",
        "PatchedRouteDefinitionRequest",
        "RouteTargetWriteRequest",
    ]:
        assert components[strict]["additionalProperties"] is False, strict
    # These ignore unknown fields, so the schema must not claim otherwise.
    for lenient in ["LoginRequest", "UpstreamRequest", "ModelRequest"]:
        assert "additionalProperties" not in components[lenient], lenient


def test_unsigned_decimals_are_documented_without_a_minus_sign_or_an_empty_string(schema: dict[str, Any]) -> None:
    budget_cost = schema["components"]["schemas"]["ApiKeyRequest"]["properties"]["budget_cost"]

    assert budget_cost["pattern"] == "^(?:\\d{1,8}(?:\\.\\d{0,6})?|\\.\\d{1,6})$"  # no sign, no "" nor "."


def test_a_model_create_body_requires_deployments_but_a_patch_does_not(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]

    assert "deployments" in components["ModelRequest"]["required"]
    assert components["ModelRequest"]["properties"]["deployments"]["minItems"] == 1
    assert "required" not in components["PatchedModelRequest"]
    assert "deployments" not in components["Model"].get("required", [])  # ordinary users' answers omit it
