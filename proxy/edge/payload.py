"""The request body: parsed once with orjson and checked the way OpenAI checks it, before any upstream sees it."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import ProxyError, bad_request

# orjson.dumps refuses to nest deeper than this (orjson.loads accepts 1024): a deeper body could not be
# forwarded, so it is refused up front, whatever the upstream kind.
MAX_JSON_DEPTH = 254
# Optional fields checked for their JSON type (None, i.e. null or absent, passes): a wrong type is the
# client's 400 here rather than a crash in the mock or an upstream's 400 after a round trip.
_INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "n")
_NUMBER_FIELDS = ("temperature", "top_p")
_NUMBER_TYPES = (int, float)


_JSON_TYPE_NAMES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", dict: "an object"}


def payload_parse(body: bytes, required: str) -> dict[str, Any]:
    """The body as a JSON object with a model and the ``required`` field; a 400 ``ProxyError`` otherwise."""
    if not body:
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    # Nesting deeper than MAX_JSON_DEPTH needs more brackets than that: two C-speed counts spare the
    # common body any walk, and only a bracket-heavy one pays for a trial encoding.
    if len(body) > 2 * MAX_JSON_DEPTH and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        try:
            orjson.dumps(payload)
        except orjson.JSONEncodeError:
            raise too_deep() from None
    model = payload.get("model")
    if type(model) is not str or not model:
        raise bad_request("'model' is required and must be a non-empty string.", param="model", code="missing_model")
    value = payload.get(required)
    if value is None:
        raise bad_request(f"'{required}' is required.", param=required, code=f"missing_{required}")
    if required == "messages":
        if type(value) is not list or not value:
            given = "an empty array" if type(value) is list else _JSON_TYPE_NAMES.get(type(value), "a value")
            raise bad_request(
                f"'messages' must be a non-empty array of message objects, not {given}.",
                param="messages",
                code="invalid_messages",
            )
        for message in value:
            if type(message) is not dict:
                raise bad_request(
                    "Each item of 'messages' must be a message object.", param="messages", code="invalid_messages"
                )
    elif not _is_prompt(value):
        raise bad_request(
            f"'{required}' must be a string, an array of strings, an array of token ids"
            " or an array of token-id arrays.",
            param=required,
            code=f"invalid_{required}",
        )
    stream = payload.get("stream")
    if stream is not None and type(stream) is not bool:
        raise bad_request("'stream' must be a boolean.", param="stream", code="invalid_stream")
    options = payload.get("stream_options")
    if options is not None and type(options) is not dict:
        raise bad_request("'stream_options' must be an object.", param="stream_options", code="invalid_stream_options")
    for name in _INTEGER_FIELDS:
        number = payload.get(name)
        if number is not None and type(number) is not int:
            raise bad_request(f"'{name}' must be an integer.", param=name, code="invalid_type")
    for name in _NUMBER_FIELDS:
        number = payload.get(name)
        if number is not None and type(number) not in _NUMBER_TYPES:
            raise bad_request(f"'{name}' must be a number.", param=name, code="invalid_type")
    return payload


def stream_usage_request(payload: dict[str, Any]) -> bool:
    """Ask the upstream for the usage chunk of a stream; returns whether the client asked for it itself.

    The usage chunk is how a stream's tokens are counted; the relay drops it again unless the client asked.
    """
    options = payload.get("stream_options")
    if isinstance(options, dict):
        payload["stream_options"] = {**options, "include_usage": True}
        return options.get("include_usage") is True
    payload["stream_options"] = {"include_usage": True}
    return False


def too_deep() -> ProxyError:
    return bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="body_too_deep")


def _is_prompt(value: Any) -> bool:
    """OpenAI's shapes for ``prompt`` and ``input``: a string, or a non-empty array of strings, of token ids
    (integers) or of non-empty token-id arrays. ``type() is`` rather than isinstance: a bool is no token id."""
    kind = type(value)
    if kind is str:
        return True
    if kind is not list or not value:
        return False
    first = type(value[0])
    if first is str or first is int:
        return all(type(item) is first for item in value)
    if first is list:
        return all(type(item) is list and item and all(type(t) is int for t in item) for item in value)
    return False
