"""Picking a target: the model, then its fallbacks; within each, a deployment by the model's balancer.

The fallback loop in ``pipeline`` asks here for the next deployment after a failed attempt (another one
first, the same one again if it is the only one left and its breaker still admits it), and reports each
attempt's end to the balancer (``deployment_finished``), which feeds the deployment's breaker.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway_stats.usage import UsageEvent
from proxy.catalog import Catalog, DeploymentTarget, ModelTarget
from proxy.edge.breaker import breaker_retry_after_s
from proxy.errors import UpstreamError, UpstreamRefused


def candidates(catalog: Catalog, target: ModelTarget) -> list[ModelTarget]:
    """The model itself, then its fallbacks in order (unknown or inactive ones skipped)."""
    found = [target]
    for name in target.fallbacks:
        fallback = catalog.models.get(name)
        if fallback is not None and fallback not in found:
            found.append(fallback)
    return found


def deployment_pick(target: ModelTarget, tried: set[str] | None = None) -> DeploymentTarget | None:
    """A deployment of ``target``, avoiding the deployments already ``tried`` (keys) when it can; None when no
    deployment's breaker admits a call."""
    if not tried:
        return target.pick()
    return target.pick(exclude=tried) or target.pick()


def deployment_finished(target: ModelTarget, deployment: DeploymentTarget, ok: bool | None, elapsed_s: float) -> None:
    """Report the end of an attempt on ``deployment`` (``ok`` None: the client left first)."""
    target.balancer.finished(deployment, ok=ok, elapsed_s=elapsed_s)


def breaker_failed(failure: UpstreamError) -> bool:
    """Whether a failed attempt counts against the deployment's breaker: a 5xx, a refused or broken connection,
    a timeout, a broken answer. A 4xx is the client's to fix (or our credentials'): not a sign of ill health."""
    return not isinstance(failure, UpstreamRefused) or failure.upstream_status >= 500


def retry_after_s(targets: Iterable[ModelTarget]) -> int | None:
    """Seconds until the soonest open breaker among ``targets``' deployments half-opens; None if none is open."""
    return breaker_retry_after_s(d.key for target in targets for d in target.deployments)


def deployment_note(event: UsageEvent, target: ModelTarget, deployment: DeploymentTarget) -> None:
    """Name the model and deployment answering in the usage event (the last attempt's, after a fallback)."""
    event.model = target.name
    event.upstream = deployment.upstream.name
    event.upstream_model = deployment.upstream_model
    event.input_price_per_1k = target.input_price_per_1k
    event.output_price_per_1k = target.output_price_per_1k
