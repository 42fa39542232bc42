"""OpenAI-shaped proxy errors: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal on the proxy path raises ``ProxyError``; the ASGI app and the
Django views turn it into the same JSON answer with the same status. Anything
else that goes wrong on the path becomes ``internal_error()`` (a bug: logged
once with its traceback) or ``service_unavailable()`` (the database or the
shared cache is down and the answer needs it: the client may retry).
"""

from __future__ import annotations

import orjson

from apiforge.unavailable import RETRY_AFTER_S

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
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers
        self._type = error_type

    @property
    def error_type(self) -> str:
        """OpenAI's ``type``: by status, unless given (e.g. ``insufficient_quota``, OpenAI's own for a 429)."""
        return self._type or _TYPES.get(self.status, "api_error")

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


# Upstream answers worth another attempt (on another deployment when there is one).
RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})


class UpstreamError(ProxyError):
    """A failed upstream call, raised by ``proxy.edge.send.upstream_send`` and by a stream being relayed.

    The fallback loop in ``proxy.edge.pipeline`` is the one place that catches them: retries decide on
    ``retryable`` there, and breakers and metrics hook in at the same spot. The status and message are
    what the client gets if no other attempt succeeds.
    """

    retryable = False


class UpstreamTimeout(UpstreamError):
    def __init__(self, upstream: str) -> None:
        super().__init__(504, f"The upstream {upstream!r} did not answer in time.", code="upstream_timeout")


class UpstreamUnreachable(UpstreamError):
    """No answer at all (connection refused or reset): nothing was processed, so another attempt is safe."""

    retryable = True

    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__(502, f"Could not reach the upstream {upstream!r} ({reason}).", code="upstream_error")


class UpstreamRefused(UpstreamError):
    """The upstream answered ``upstream_status`` (not 200); ``message`` is its own text, already scrubbed."""

    def __init__(self, upstream: str, upstream_status: int, message: str) -> None:
        self.upstream_status = upstream_status
        self.retryable = upstream_status in RETRYABLE_STATUSES
        # 4xx answers (bad parameters, context too long) are the client's to fix: pass them on, except
        # 401/403/404, which say our upstream credentials or model mapping are wrong, not the client's.
        if 400 <= upstream_status < 500 and upstream_status not in (401, 403, 404, 407):
            text = message or f"The upstream refused the request ({upstream_status})."
            super().__init__(upstream_status, text, code="upstream_refused")
            return
        detail = f": {message}" if message and upstream_status not in (401, 403, 407) else ""
        super().__init__(502, f"The upstream {upstream!r} answered {upstream_status}{detail}", code="upstream_error")


class UpstreamBrokeOff(UpstreamError):
    """The answer started and then failed: invalid JSON, or a stream cut short."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, code="upstream_error")


_RETRY_AFTER = ((b"retry-after", str(RETRY_AFTER_S).encode()),)


def service_unavailable() -> ProxyError:
    return ProxyError(
        503,
        "The gateway cannot reach its database or shared cache for this request; retry shortly.",
        code="service_unavailable",
        headers=_RETRY_AFTER,
    )


# A secret shorter than this is not blanked out of a message: it cannot be a real credential, and
# replacing it would garble the text.
MIN_SECRET_LENGTH = 8


def secret_blank(message: str, secret: str | None) -> str:
    """``message`` with ``secret`` replaced by ``***`` (client-supplied values and upstream error texts can quote
    a credential: the presented key in a model name, ours in "Incorrect API key provided: ...")."""
    if secret and len(secret) >= MIN_SECRET_LENGTH and secret in message:
        return message.replace(secret, "***")
    return message


def internal_error() -> ProxyError:
    return ProxyError(500, "The gateway failed to handle this request.", code="internal_error")
