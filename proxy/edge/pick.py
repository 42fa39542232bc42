"""Picking a target: the model, then its fallbacks; within each, a deployment by weighted choice.

The balancer and breaker issue replaces the choice; the fallback loop in ``pipeline`` asks here for the
next deployment after a failed attempt.
"""

from __future__ import annotations

from gateway_stats.usage import UsageEvent
from proxy.catalog import Catalog, DeploymentTarget, ModelTarget


def candidates(catalog: Catalog, target: ModelTarget) -> list[ModelTarget]:
    """The model itself, then its fallbacks in order (unknown or inactive ones skipped)."""
    found = [target]
    for name in target.fallbacks:
        fallback = catalog.models.get(name)
        if fallback is not None and fallback not in found:
            found.append(fallback)
    return found


def deployment_pick(target: ModelTarget, tried: frozenset[int] = frozenset()) -> DeploymentTarget | None:
    """A deployment of ``target`` by weight, avoiding the upstreams already ``tried`` when it can."""
    return target.pick(exclude=tried)


def deployment_note(event: UsageEvent, target: ModelTarget, deployment: DeploymentTarget) -> None:
    """Name the model and deployment answering in the usage event (the last attempt's, after a fallback)."""
    event.model = target.name
    event.upstream = deployment.upstream.name
    event.upstream_model = deployment.upstream_model
    event.input_price_per_1k = target.input_price_per_1k
    event.output_price_per_1k = target.output_price_per_1k
