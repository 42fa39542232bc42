"""The management API's JSON parser: DRF's, plus limits on what a body may hold.

- Nesting deeper than ``MAX_DEPTH`` is a 400 ``parse_error`` (Python's json module
  would otherwise raise ``RecursionError`` at about 1000 levels: a 500, and deep
  values break code further on that walks them recursively).
- NUL characters and lone UTF-16 surrogates (``"\\u0000"``, ``"\\ud800"``) in any
  string or object key are a 400 naming the field: PostgreSQL cannot store either,
  and DRF only refuses NUL in plain ``CharField``s, not in JSON, dict or list values.

The body size limit is Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE``; ``apiforge.errors``
answers it with 413.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from typing import Any

from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser as DRFJSONParser
from rest_framework.parsers import get_encoding  # type: ignore[attr-defined]  # not in the stubs
from rest_framework.settings import api_settings
from rest_framework.utils import json as drf_json

# Far more than any request body of the API needs (a model's deployments are 3 levels deep).
MAX_DEPTH = 32

NUL_MESSAGE = "Null characters are not allowed."
SURROGATE_MESSAGE = "Unpaired surrogate characters are not allowed."
_FORBIDDEN = re.compile("[\x00\ud800-\udfff]")


def _problem(text: str) -> str | None:
    match = _FORBIDDEN.search(text)
    if match is None:
        return None
    return NUL_MESSAGE if match.group() == "\x00" else SURROGATE_MESSAGE


def _path(parts: tuple[str, ...]) -> str:
    return ".".join(parts) if parts else api_settings.NON_FIELD_ERRORS_KEY


def json_value_check(data: Any) -> None:
    """Walk a parsed JSON value (iteratively): raise ``ParseError`` if too deep, ``ValidationError`` on bad text.

    Field errors are keyed by the dotted path of the offending value (``metadata.note``,
    ``deployments.0.upstream``); a bad object key is reported on the object holding it.
    """
    errors: dict[str, list[str]] = {}
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, parts = stack.pop()
        if len(parts) > MAX_DEPTH:
            raise ParseError(f"JSON parse error - nesting deeper than {MAX_DEPTH} levels.")
        if isinstance(value, str):
            message = _problem(value)
            if message:
                errors.setdefault(_path(parts), []).append(message)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                message = _problem(key)
                if message:
                    errors.setdefault(_path(parts), []).append(message)
                    continue
                stack.append((item, (*parts, key)))
        elif isinstance(value, list):
            stack.extend((item, (*parts, str(index))) for index, item in enumerate(value))
    if errors:
        raise serializers.ValidationError({path: sorted(set(messages)) for path, messages in errors.items()})


class JSONParser(DRFJSONParser):
    """``rest_framework.parsers.JSONParser`` with a depth limit and text checks (see the module docstring)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        encoding = get_encoding(parser_context or {})
        try:
            text = codecs.getreader(encoding)(stream).read()
            parse_constant = drf_json.strict_constant if self.strict else None
            data = drf_json.loads(text, parse_constant=parse_constant)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        except RecursionError as exc:
            raise ParseError(f"JSON parse error - nesting deeper than {MAX_DEPTH} levels.") from exc
        json_value_check(data)
        return data
