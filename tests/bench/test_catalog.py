"""Model catalog lookups: the in-process catalog a proxied request reads its route from."""

from __future__ import annotations

import pytest

from proxy.catalog import catalog_get, catalog_get_async
from tests.bench.conftest import run_without_suspending
from tests.proxy.helpers import model_make, upstream_make

pytestmark = [pytest.mark.bench, pytest.mark.django_db]


@pytest.fixture
def warm_catalog():
    upstream = upstream_make(name="bench-upstream", base_url="http://127.0.0.1:9/v1")
    for index in range(20):
        model_make(f"model-{index}", upstream)
    model_make("bench-model", upstream, upstream_model="gpt-x")
    catalog_get()


def test_catalog_lookup_of_a_model_route(benchmark, warm_catalog, django_assert_num_queries):
    def lookup():
        return catalog_get().models["bench-model"].pick()

    with django_assert_num_queries(0):
        deployment = benchmark(lookup)
    assert deployment.upstream_model == "gpt-x"


def test_catalog_get_async_hit_completes_without_suspending(benchmark, warm_catalog, django_assert_num_queries):
    def lookup():
        return run_without_suspending(catalog_get_async()).models["bench-model"]

    with django_assert_num_queries(0):
        route = benchmark(lookup)
    assert route.deployments[0].upstream.name == "bench-upstream"
