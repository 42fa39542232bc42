"""Request ids: one per request, kept in a context variable, on every log line and response.

An incoming ``x-request-id`` is kept when it is sane (1-128 characters of
``[A-Za-z0-9._:-]``); otherwise a new one is made. The lean proxy app uses the
same two functions, so both paths behave alike.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
from contextvars import ContextVar
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

REQUEST_ID_HEADER = "x-request-id"
_SANE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")

# A fresh id is a random per-process tag plus a counter: unique across processes and restarts in
# practice, and far cheaper per request than uuid4 (which reads the kernel's random source each time).
_PROCESS_TAG = secrets.token_hex(6)
_sequence = itertools.count(1)


def _new_process_tag() -> None:
    global _PROCESS_TAG, _sequence
    _PROCESS_TAG = secrets.token_hex(6)
    _sequence = itertools.count(1)


os.register_at_fork(after_in_child=_new_process_tag)

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


def request_id_from(incoming: bytes | str | None) -> str:
    """The id to use for a request: the incoming one when sane, else a fresh one."""
    if incoming:
        raw = incoming.encode("latin-1", "replace") if isinstance(incoming, str) else incoming
        if _SANE.match(raw):
            return raw.decode("ascii")
    return f"{_PROCESS_TAG}{next(_sequence):012x}"


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class RequestIdMiddleware:
    """Sets the request id for the request's duration and echoes it in ``x-request-id``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _begin(self, request: HttpRequest) -> Any:
        rid = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        request.request_id = rid  # type: ignore[attr-defined]
        return rid, request_id_var.set(rid)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        rid, token = self._begin(request)
        try:
            response: HttpResponseBase = self.get_response(request)
            response[REQUEST_ID_HEADER] = rid
            return response
        finally:
            request_id_var.reset(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        rid, token = self._begin(request)
        try:
            response: HttpResponseBase = await self.get_response(request)
            response[REQUEST_ID_HEADER] = rid
            return response
        finally:
            request_id_var.reset(token)
