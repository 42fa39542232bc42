"""Domain errors of the proxy app's management side (the hot path's own are in ``proxy/errors.py``).

``apiforge.errors.api_exception_handler`` turns them into the API's error shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from rest_framework import status

from apiforge.errors import DomainError


class UpstreamInUse(DomainError):
    """The upstream still serves deployments, so it cannot be deleted."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "upstream_in_use"

    def __init__(self, *, upstream_name: str, model_names: Sequence[str]) -> None:
        self.upstream_name = upstream_name
        self.model_names = list(model_names)
        listed = ", ".join(self.model_names) or "a model"
        super().__init__(
            f"Upstream “{upstream_name}” is still used by deployments of: {listed}. "
            "Remove or move those deployments first."
        )
