"""The access log: one structured line per proxied call, written from the usage thread (never the request path).

Logger ``apiforge.access`` at INFO. Nothing secret and no body is ever in a line: the key appears as its public
prefix, the path as its bounded endpoint name (a client can put anything in a path, its key included).
``ACCESS_LOG=false`` turns it off; so does a level above INFO for that logger (``LOG_LEVEL``).

A line is a call's fields (``access_log_fields``) and a short human message (``POST /v1/chat/completions 200
gpt-4o 812.4ms``). ``settings.LOGGING`` gives the logger its own handler, ``AccessLogHandler`` (stderr, not
propagated to the root), with ``AccessLogFormatter``: JSON lines made with orjson (``LOG_FORMAT=json``: every field
a key of its own, beside ``time``, ``level``, ``logger`` and ``message``) or the console line of development.

This runs once per call, on a thread that shares the GIL with the server's event loop, so the logging machinery
is skipped where it can be: an ``AccessLogHandler`` whose formatter is an ``AccessLogFormatter`` gets the whole
batch, formats it straight into one string (one ``orjson.dumps`` for a batch of JSON lines) and writes and
flushes it once; its lines are the ones its formatter makes of the equivalent records (``access_log_fields``).
Any other handler of the logger (the operator's, pytest's capture handlers) gets an ordinary ``LogRecord`` per
call, with the fields as attributes; so does every handler when the logger propagates or has filters.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import IO, Any, Literal

import orjson
from django.conf import settings

from gateway_stats.metrics import endpoint_label
from gateway_stats.usage import UsageEvent

LOGGER_NAME = "apiforge.access"
logger = logging.getLogger(LOGGER_NAME)

_MESSAGE = "%s %s %s %s %.1fms"
_LEVEL = "INFO"
# The attributes every LogRecord has: the rest of a record's __dict__ is what ``extra`` added.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS
# What a console line of a batch is made of without a record (the settings' console format names no more).
_CONSOLE_NAMES = frozenset({"asctime", "levelname", "levelno", "name", "request_id", "message"})


def access_log_fields(event: UsageEvent) -> dict[str, Any]:
    """The fields of one call's access-log line."""
    return {
        "request_id": event.request_id,
        "key_prefix": event.key_prefix,
        "method": event.method,
        "endpoint": endpoint_label(event.endpoint),
        "model": event.model,
        "route": event.route,
        "upstream": event.upstream,
        "status": event.status,
        "error_code": event.error_code,
        "stream": event.stream,
        "latency_ms": round(event.latency_ms, 3),
        "ttfb_ms": round(event.ttfb_ms, 3),
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "client_ip": event.client_ip,
    }


def _message(event: UsageEvent, endpoint: str, latency_ms: float) -> str:
    """The human part of a line: ``POST /v1/chat/completions 200 gpt-4o 812.4ms`` (a route call: its route)."""
    return f"{event.method} {endpoint} {event.status} {event.model or event.route or '-'} {latency_ms:.1f}ms"


def _json_lines(batch: list[UsageEvent], stamp: str, terminator: str) -> str:
    """The JSON lines of a (non-empty) batch: the fields of ``access_log_fields``, the keys of ``format``.

    One ``orjson.dumps`` of the whole batch, an array, cut into lines where one object ends and the next begins:
    a tenth of the cost of one call per line (each allocates and shrinks its own buffer). The cut is exact:
    every value is a string, a number, a boolean or null, so the only ``{`` outside a string opens a line's
    object, and a ``"`` inside a string is escaped, so ``},{"time":`` occurs nowhere else.
    """
    label = endpoint_label
    documents = []
    for event in batch:
        endpoint, latency_ms = label(event.endpoint), round(event.latency_ms, 3)
        documents.append(
            {
                "time": stamp,
                "level": _LEVEL,
                "logger": LOGGER_NAME,
                "request_id": event.request_id,
                "message": _message(event, endpoint, latency_ms),
                "key_prefix": event.key_prefix,
                "method": event.method,
                "endpoint": endpoint,
                "model": event.model,
                "route": event.route,
                "upstream": event.upstream,
                "status": event.status,
                "error_code": event.error_code,
                "stream": event.stream,
                "latency_ms": latency_ms,
                "ttfb_ms": round(event.ttfb_ms, 3),
                "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens,
                "client_ip": event.client_ip,
            }
        )
    try:
        array = orjson.dumps(documents, default=str)
    except orjson.JSONEncodeError:  # a string orjson refuses (a lone surrogate): the standard library escapes it
        return "".join([json.dumps(document, separators=(",", ":")) + terminator for document in documents])
    end = terminator.encode()
    return (array[1:-1].replace(b'},{"time":', b"}" + end + b'{"time":') + end).decode()


@functools.cache
def _format_names(fmt: str) -> frozenset[str]:
    """The record attributes a %-style format names."""
    return frozenset(re.findall(r"%\((\w+)\)", fmt))


class AccessLogFormatter(logging.Formatter):
    """JSON lines (orjson) or the console line, for access-log records and for whole batches of their fields.

    ``json=True``: ``{"time", "level", "logger", "request_id", "message", <every extra field>}`` (the keys of
    the ``json`` formatter of the settings). ``json=False``: ``fmt`` (the console format) as usual.
    """

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        style: Literal["%", "{", "$"] = "%",
        *,
        json: bool = False,
    ) -> None:
        super().__init__(fmt, datefmt, style)
        self.json = json

    def format(self, record: logging.LogRecord) -> str:
        if not self.json:
            return super().format(record)
        document: dict[str, Any] = {
            "time": self.formatTime(record, self.datefmt),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in document:
                document[name] = value
        if record.exc_info:
            document["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str, option=_JSON_OPTIONS).decode()

    def format_batch(self, batch: list[UsageEvent], terminator: str) -> str:
        """The lines of a batch of calls, as ``format`` writes the records the fallback makes of them (now)."""
        stamp = self._stamp()
        if self.json:
            return _json_lines(batch, stamp, terminator)
        names = _format_names(self._style._fmt) if type(self._style) is logging.PercentStyle else None
        if names is None or not names <= _CONSOLE_NAMES:  # another style, or the fields named: through records
            return "".join([self.format(_record(access_log_fields(event))) + terminator for event in batch])
        fmt = self._style._fmt
        values = {"asctime": stamp, "levelname": _LEVEL, "levelno": logging.INFO, "name": LOGGER_NAME}
        lines = []
        for event in batch:
            values["request_id"] = event.request_id
            values["message"] = _message(event, endpoint_label(event.endpoint), round(event.latency_ms, 3))
            lines.append(fmt % values + terminator)
        return "".join(lines)

    def _stamp(self) -> str:
        """``formatTime`` of a record made now (once per batch)."""
        return self.formatTime(logging.LogRecord(LOGGER_NAME, logging.INFO, "", 0, "", (), None), self.datefmt)


class AccessLogHandler(logging.StreamHandler[IO[str]]):
    """The access log's stream handler (stderr by default): writes and flushes a whole batch at once."""

    def batchable(self) -> bool:
        """Whether ``emit_batch`` writes what ``handle`` would: no filters, our formatter, INFO let through."""
        return not self.filters and isinstance(self.formatter, AccessLogFormatter) and self.level <= logging.INFO

    def emit_batch(self, batch: list[UsageEvent]) -> None:
        """Write the lines of a batch of calls: one write, one flush (call it when ``batchable``)."""
        formatter = self.formatter
        try:
            if isinstance(formatter, AccessLogFormatter):
                text = formatter.format_batch(batch, self.terminator)
            else:
                text = "".join([self.format(_record(access_log_fields(event))) + self.terminator for event in batch])
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(text)
                self.flush()
        except Exception:
            self.handleError(_record(access_log_fields(batch[0])))


def _record(fields: dict[str, Any]) -> logging.LogRecord:
    args = (fields["method"], fields["endpoint"], fields["status"], fields["model"] or "-", fields["latency_ms"])
    # logger.info() without its caller lookup (the same record, cheaper): the fallback runs once per call.
    return logger.makeRecord(LOGGER_NAME, logging.INFO, __file__, 0, _MESSAGE, args, None, extra=fields)


def usage_access_log_sink(batch: list[UsageEvent]) -> None:
    """Usage sink: one INFO line per call of the batch."""
    if not batch or not settings.ACCESS_LOG or not logger.isEnabledFor(logging.INFO):
        return
    if logger.propagate or logger.filters or logger.disabled:  # not the settings' logger: the usual way
        for event in batch:
            logger.handle(_record(access_log_fields(event)))
        return
    # What Logger.handle() does for a logger that does not propagate, a batch at a time for our handlers.
    others = []
    for handler in logger.handlers:
        if isinstance(handler, AccessLogHandler) and handler.batchable():
            handler.emit_batch(batch)
        else:
            others.append(handler)
    if others:
        for event in batch:
            record = _record(access_log_fields(event))
            for handler in others:
                if record.levelno >= handler.level:
                    handler.handle(record)
