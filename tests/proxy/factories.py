"""factory_boy factories for the proxy app's models (users come from tests/factories.py)."""

from __future__ import annotations

from decimal import Decimal

import factory
from factory.django import DjangoModelFactory

from proxy.models import Deployment, Model, Upstream


class UpstreamFactory(DjangoModelFactory):
    """An active OpenAI-compatible upstream without an API key (pass ``api_key=`` to store one, encrypted)."""

    class Meta:
        model = Upstream

    name = factory.Sequence(lambda n: f"upstream-{n}")
    kind = Upstream.Kind.OPENAI
    base_url = factory.LazyAttribute(lambda upstream: f"https://{upstream.name}.example.test/v1")
    timeout_s = 30.0
    max_retries = 2
    extra_headers = factory.LazyFunction(dict)

    class Params:
        mock = factory.Trait(kind=Upstream.Kind.MOCK, base_url="")


class ModelFactory(DjangoModelFactory):
    class Meta:
        model = Model

    name = factory.Sequence(lambda n: f"model-{n}")
    fallbacks = factory.LazyFunction(list)
    input_price_per_1k = Decimal("0.5")
    output_price_per_1k = Decimal("1.5")


class DeploymentFactory(DjangoModelFactory):
    class Meta:
        model = Deployment

    model = factory.SubFactory(ModelFactory)
    upstream = factory.SubFactory(UpstreamFactory)
    upstream_model = factory.Sequence(lambda n: f"upstream-model-{n}")
    weight = 1
