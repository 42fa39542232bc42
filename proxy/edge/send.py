"""Sending: the one upstream call, JSON or stream, through the backend of the upstream's kind.

Failures are ``UpstreamError`` subclasses (``UpstreamTimeout``, ``UpstreamUnreachable``,
``UpstreamRefused(status)``, ``UpstreamBrokeOff``); the fallback loop in ``pipeline`` is the one place
that catches them, so retries, breakers and metrics hook in there.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from proxy.catalog import DeploymentTarget
from proxy.edge.backends import BACKENDS, UpstreamAnswer


def upstream_send(
    endpoint: str, payload: dict[str, Any], deployment: DeploymentTarget, stream: bool
) -> Coroutine[Any, Any, UpstreamAnswer]:
    """Call ``deployment`` for ``endpoint``: await the result (the backend's own coroutine, no extra layer)."""
    return BACKENDS[deployment.upstream.kind].send(endpoint, payload, deployment, stream)
