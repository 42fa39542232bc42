"""``GET /v1/models`` and ``/v1/models/<name>``: the public models the key may use, from the catalog."""

from __future__ import annotations

from typing import Any

import orjson

from keys.verification import KeyPolicy
from proxy.catalog import ModelTarget, catalog_get_async
from proxy.edge.authenticate import model_target
from proxy.edge.endpoints import MODELS, MODELS_PREFIX
from proxy.edge.exchange import ProxyResponse


async def models_answer(path: str, policy: KeyPolicy) -> ProxyResponse:
    catalog = await catalog_get_async()
    if path == MODELS:
        data = [_model_object(target) for name, target in sorted(catalog.models.items()) if policy.allows_model(name)]
        return ProxyResponse(200, orjson.dumps({"object": "list", "data": data}))
    target = model_target(catalog, policy, path[len(MODELS_PREFIX) :])
    return ProxyResponse(200, orjson.dumps(_model_object(target)))


def _model_object(target: ModelTarget) -> dict[str, Any]:
    return {"id": target.name, "object": "model", "created": target.created, "owned_by": "apiforge"}
