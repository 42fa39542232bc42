"""The OpenAI endpoints the proxy answers, by path: what each needs of a request."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import ProxyError, not_found

MODELS = "/v1/models"
MODELS_PREFIX = "/v1/models/"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # the upstream's path under its base URL; "models" for the listing answered here
    method: str
    required: str = ""  # the body field the endpoint cannot do without
    streamable: bool = False


_POST = {
    "/v1/chat/completions": Endpoint("chat/completions", "POST", "messages", streamable=True),
    "/v1/completions": Endpoint("completions", "POST", "prompt", streamable=True),
    "/v1/embeddings": Endpoint("embeddings", "POST", "input"),
}
_MODELS = Endpoint("models", "GET")


def endpoint_for(method: str, path: str) -> Endpoint:
    """The endpoint at ``path``; a 404 for an unknown path, a 405 for the wrong method."""
    endpoint = _POST.get(path)
    if endpoint is None:
        if path != MODELS and not path.startswith(MODELS_PREFIX):
            raise not_found(f"Unknown path {path}.", code="unknown_url")
        endpoint = _MODELS
    if method != endpoint.method:
        raise ProxyError(
            405,
            f"Method {method} not allowed on {path}.",
            code="method_not_allowed",
            headers=((b"allow", endpoint.method.encode()),),
        )
    return endpoint
