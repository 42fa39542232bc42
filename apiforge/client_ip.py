"""The client address of a request, as every IP-dependent feature (audit, throttles, allowlists) must read it."""

from __future__ import annotations

from django.http import HttpRequest
from rest_framework.request import Request


def client_ip(request: HttpRequest | Request) -> str | None:
    """The address the request came from, or ``None`` when the server gave none.

    ``REMOTE_ADDR`` is the truth here, and the only place the trusted-proxy setting applies is
    before it: the ASGI server (uvicorn, see ``apiforge/server.py``) replaces the peer address with
    the one in ``X-Forwarded-For`` only when the peer is listed in ``FORWARDED_ALLOW_IPS`` (README,
    "Request limits"). Reading ``X-Forwarded-For`` here would let any client choose its address.
    """
    return request.META.get("REMOTE_ADDR") or None
