"""The route registry in the OpenAPI document: the seed's paths, once each, generated without warnings, with the
API-key security schemes next to JWT, strict request bodies and the answers each operation can give."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import include, path
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.generators import SchemaGenerator

pytestmark = pytest.mark.django_db

ROUTE_PATHS = {
    "/api/routes": {"get"},
    "/api/register": {"post"},
    "/api/unregister": {"delete"},
    "/api/routes/{id}/": {"get", "patch", "delete"},
    "/api/routes/{id}/heartbeat": {"post"},
}


@pytest.fixture
def schema(client: Client) -> dict[str, Any]:
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return dict(json.loads(response.content))


def test_the_route_endpoints_generate_without_schema_warnings() -> None:
    GENERATOR_STATS.reset()
    generator = SchemaGenerator(patterns=[path("api/", include("proxy.urls"))])

    with GENERATOR_STATS.silence():
        generator.get_schema(request=None, public=True)

    assert not GENERATOR_STATS, dict(GENERATOR_STATS._warn_cache) | dict(GENERATOR_STATS._error_cache)


def test_each_route_endpoint_is_documented_once_at_the_seeds_path(schema: dict[str, Any]) -> None:
    documented = {p: set(item) & {"get", "post", "patch", "delete"} for p, item in schema["paths"].items()}
    for route_path, methods in ROUTE_PATHS.items():
        assert documented[route_path] == methods, route_path
    twins = {"/api/routes/", "/api/register/", "/api/unregister/", "/api/routes/{id}", "/api/routes/{id}/heartbeat/"}
    assert not twins & set(documented)


def test_route_writes_take_an_api_key_or_a_jwt(schema: dict[str, Any]) -> None:
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiKeyBearer"]["scheme"] == "bearer"
    assert schemes["apiKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "One of our API keys.",
    }
    security = schema["paths"]["/api/register"]["post"]["security"]
    assert {"apiKeyBearer": []} in security
    assert {"apiKeyHeader": []} in security
    assert {"jwtAuth": []} in security


def test_register_answers_201_or_200_and_documents_its_refusals(schema: dict[str, Any]) -> None:
    register = schema["paths"]["/api/register"]["post"]
    assert {"200", "201", "400", "401", "403", "413", "415"} <= set(register["responses"])
    assert "404" in schema["paths"]["/api/unregister"]["delete"]["responses"]
    body = schema["components"]["schemas"]["RouteDefinitionRequest"]
    assert {"name", "path", "targets"} <= set(body["required"])
    assert body["properties"]["targets"]["minItems"] == 1
    assert "required" not in schema["components"]["schemas"]["PatchedRouteDefinitionRequest"]
    # Ordinary users' answers leave the internals out: the schema may not require them.
    answer = schema["components"]["schemas"]["Route"]
    assert {"targets", "request_headers", "lease_expired"}.isdisjoint(answer["required"])
    assert {"id", "name", "path", "version", "methods", "auth", "is_active"} <= set(answer["required"])
