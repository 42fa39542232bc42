"""Domain errors of the proxy app's management side (the hot path's own are in ``proxy/errors.py``)."""

from __future__ import annotations

from collections.abc import Sequence


class UpstreamInUse(Exception):
    """The upstream still serves deployments, so it cannot be deleted."""

    def __init__(self, *, upstream_name: str, model_names: Sequence[str]) -> None:
        self.upstream_name = upstream_name
        self.model_names = list(model_names)
        listed = ", ".join(self.model_names) or "a model"
        super().__init__(
            f"Upstream “{upstream_name}” is still used by deployments of: {listed}. "
            "Remove or move those deployments first."
        )
