"""factory_boy factories for routes and their targets (written around the services: test setup only)."""

from __future__ import annotations

import factory
from factory.django import DjangoModelFactory

from proxy.models import Route, RouteTarget


class RouteFactory(DjangoModelFactory):
    """An active route at ``/<name>`` without a lease or targets (add them with ``RouteTargetFactory``)."""

    class Meta:
        model = Route

    name = factory.Sequence(lambda n: f"route-{n}")
    path = factory.LazyAttribute(lambda route: f"/{route.name}")
    auth = Route.Auth.KEY


class RouteTargetFactory(DjangoModelFactory):
    class Meta:
        model = RouteTarget

    route = factory.SubFactory(RouteFactory)
    url = factory.Sequence(lambda n: f"http://target-{n}.internal:8080")
    weight = 1
