"""OpenAI-shaped proxy errors: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal on the proxy path raises ``ProxyError``; the ASGI app and the
Django views turn it into the same JSON answer with the same status. Anything
else that goes wrong on the path becomes ``internal_error()`` (a bug: logged
once with its traceback) or ``service_unavailable()`` (the database or the
shared cache is down and the answer needs it: the client may retry).
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
    500: "server_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


class ProxyError(Exception):
    """A refusal or failure with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers

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


# Seconds a client should wait before retrying when the database is unreachable.
RETRY_AFTER_S = 5
_RETRY_AFTER = ((b"retry-after", str(RETRY_AFTER_S).encode()),)


def service_unavailable() -> ProxyError:
    return ProxyError(
        503,
        "The gateway cannot reach its database or shared cache for this request; retry shortly.",
        code="service_unavailable",
        headers=_RETRY_AFTER,
    )


def internal_error() -> ProxyError:
    return ProxyError(500, "The gateway failed to handle this request.", code="internal_error")
