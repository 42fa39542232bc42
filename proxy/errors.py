"""OpenAI-shaped proxy errors: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal on the proxy path raises ``ProxyError``; the ASGI app and the
Django views turn it into the same JSON answer with the same status.
"""

from __future__ import annotations

import orjson

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


class ProxyError(Exception):
    """A refusal or failure with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def error_type(self) -> str:
        return _TYPES.get(self.status, "api_error")

    def payload(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def sse_event(self) -> bytes:
        """The error as one Server-Sent Event, for failures after a stream has started."""
        return b"data: " + self.body() + b"\n\n"


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> ProxyError:
    return ProxyError(400, message, code=code, param=param)


def not_found(message: str, *, code: str = "not_found") -> ProxyError:
    return ProxyError(404, message, code=code)


def upstream_error(message: str) -> ProxyError:
    return ProxyError(502, message, code="upstream_error")


def upstream_timeout(upstream: str) -> ProxyError:
    return ProxyError(504, f"The upstream {upstream!r} did not answer in time.", code="upstream_timeout")
