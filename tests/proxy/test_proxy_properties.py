"""Property tests of the proxy's request handling: whatever a client sends, an OpenAI-shaped answer, never a 5xx.

Hypothesis drives the lean ASGI app (``proxy.asgi.proxy_app``) in-process with real ASGI messages
(tests/proxy/asgi_client.py) against a model on the built-in ``mock`` upstream and a key created by
the factories: arbitrary bytes, invalid UTF-8, deep and wide JSON, numbers no double holds, every field
with every JSON type, duplicate and oversized headers, bodies split anywhere. Each answer must be a 2xx
(JSON, or SSE ending in ``[DONE]``) or an OpenAI-shaped 4xx (``{"error": {message, type, param, code}}``)
and must come within the exchange's timeout.

Bounded and reproducible: ``derandomize=True`` (the same examples every run), no example database (the
repository stays clean), ``EXAMPLES`` examples per property.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from asgiref.sync import async_to_sync
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.asgi import proxy_app
from proxy.edge.payload import MAX_JSON_DEPTH
from tests.proxy.asgi_client import AsgiAnswer, asgi_request
from tests.proxy.helpers import key_make, model_make, upstream_make

EXAMPLES = 150
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # The gateway fixture's rows are only read, so sharing them across examples is fine.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
REQUIRED = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "demo", "prompt": "hi"},
    "/v1/embeddings": {"model": "demo", "input": "hi"},
}


@pytest.fixture
def secret(transactional_db: Any) -> str:
    upstream = upstream_make(name="mock", kind="mock")
    model_make("demo", upstream, upstream_model="demo")
    return str(key_make().secret)


def call(
    secret: str,
    path: str,
    body: bytes,
    *,
    headers: Sequence[tuple[bytes, bytes]] | None = None,
    chunks: Sequence[bytes] | None = None,
) -> AsgiAnswer:
    if headers is None:
        headers = [(b"authorization", b"Bearer " + secret.encode()), (b"content-type", b"application/json")]
    return async_to_sync(asgi_request)(proxy_app, "POST", path, body=body, headers=headers, chunks=chunks, timeout=10)


def assert_well_formed(answer: AsgiAnswer) -> dict[str, Any] | None:
    """Never a 5xx; a 4xx is OpenAI-shaped JSON. Returns the error object of a 4xx (None for a 2xx)."""
    assert answer.status < 500, answer.body[:500]
    assert answer.header(b"x-request-id")
    content_type = answer.header(b"content-type")
    if answer.status == 200 and content_type == b"text/event-stream":
        assert answer.body.endswith(b"data: [DONE]\n\n"), answer.body[-200:]
        return None
    assert content_type == b"application/json"
    payload = answer.json()
    if answer.status < 400:
        return None
    assert 400 <= answer.status < 500
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert isinstance(error["code"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error, dict)
    return error


# --- JSON values of every type ---------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _tokens(value: Any) -> bool:
    return type(value) is list and bool(value) and all(type(t) is int for t in value)


def _prompt_ok(value: Any) -> bool:
    if type(value) is str:
        return True
    if type(value) is not list or not value:
        return False
    return all(type(v) is str for v in value) or all(type(v) is int for v in value) or all(_tokens(v) for v in value)


# What OpenAI accepts for each field the proxy validates (None: absent or null, for the optional ones).
ACCEPTS: dict[str, Callable[[Any], bool]] = {
    "model": lambda v: type(v) is str and v != "",
    "messages": lambda v: type(v) is list and bool(v) and all(type(m) is dict for m in v),
    "prompt": _prompt_ok,
    "input": _prompt_ok,
    "stream": lambda v: v is None or type(v) is bool,
    "stream_options": lambda v: v is None or type(v) is dict,
    "max_tokens": lambda v: v is None or type(v) is int,
    "max_completion_tokens": lambda v: v is None or type(v) is int,
    "n": lambda v: v is None or type(v) is int,
    "temperature": lambda v: v is None or type(v) in (int, float),
    "top_p": lambda v: v is None or type(v) in (int, float),
}
OPTIONAL = [name for name in ACCEPTS if name not in ("model", "messages", "prompt", "input")]


@st.composite
def field_and_value(draw: st.DrawFn) -> tuple[str, str, Any]:
    path = draw(st.sampled_from(PATHS))
    field = draw(st.sampled_from(["model", REQUIRED[path], *OPTIONAL]))
    # Half the time a value of the field's own kind's neighbours (lists of dicts, token arrays), so the
    # accepted side is explored too, not only the refusals.
    near = st.lists(st.dictionaries(st.sampled_from(["role", "content"]), scalars, max_size=2), max_size=3) | (
        st.lists(st.integers(min_value=-5, max_value=5), max_size=3)
        | st.lists(st.lists(st.integers(min_value=0, max_value=9), max_size=3), max_size=3)
        | st.lists(st.text(max_size=5), max_size=3)
    )
    value = draw(json_values | near)
    return path, field, value


# --- Properties ---------------------------------------------------------------------------------------------------
@PROPERTY
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=2048))
def test_arbitrary_bytes_are_answered_with_an_openai_shaped_4xx(secret: str, path: str, body: bytes) -> None:
    error = assert_well_formed(call(secret, path, body))
    assert error is not None
    assert error["code"] == "invalid_json"


@PROPERTY
@given(
    path=st.sampled_from(PATHS),
    before=st.text(max_size=30),
    bad=st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\xfe"]),
    after=st.text(max_size=30),
)
def test_invalid_utf8_in_a_string_is_a_400(secret: str, path: str, before: str, bad: bytes, after: str) -> None:
    text = orjson.dumps(before)[:-1] + bad + orjson.dumps(after)[1:]
    body = orjson.dumps({**VALID[path], "user": "PLACEHOLDER"}).replace(b'"PLACEHOLDER"', text)
    error = assert_well_formed(call(secret, path, body))
    assert error is not None
    assert error["code"] == "invalid_json"


@PROPERTY
@given(
    path=st.sampled_from(PATHS),
    depth=st.integers(min_value=0, max_value=1100) | st.integers(min_value=MAX_JSON_DEPTH - 3, max_value=258),
    opener=st.sampled_from(["list", "object"]),
    width=st.integers(min_value=0, max_value=3000),
    stream=st.booleans(),
)
def test_deep_and_wide_json_is_served_or_refused_never_a_5xx(
    secret: str, path: str, depth: int, opener: str, width: int, stream: bool
) -> None:
    if opener == "list":
        nested = b"[" * depth + b"0" + b"]" * depth
    else:
        nested = b'{"a":' * depth + b"0" + b"}" * depth
    wide = b"[" + b",".join([b'{"k":1}'] * width) + b"]"
    body = orjson.dumps({**VALID[path], "stream": stream, "metadata": 0, "wide": 0})
    body = body.replace(b'"metadata":0', b'"metadata":' + nested).replace(b'"wide":0', b'"wide":' + wide)
    answer = call(secret, path, body)
    error = assert_well_formed(answer)
    if 1 + depth <= MAX_JSON_DEPTH:  # the nest plus the body object around it: what orjson can re-encode
        assert answer.status == 200, answer.body[:300]
    else:
        assert error is not None
        assert error["code"] in ("body_too_deep", "invalid_json")


huge_numbers = st.sampled_from(
    ["1e400", "-1e400", "1E+99999", "1.5e308", "1e-400", "-0.0", "18446744073709551616", "-9223372036854775809"]
) | st.integers(min_value=20, max_value=6000).map(lambda digits: "1" + "0" * digits)


@PROPERTY
@given(path=st.sampled_from(PATHS), number=huge_numbers, where=st.sampled_from(["extra", "field"]), data=st.data())
def test_huge_numbers_anywhere_are_served_or_a_400(secret: str, path: str, number: str, where: str, data: Any) -> None:
    field = "seed" if where == "extra" else data.draw(st.sampled_from(["model", REQUIRED[path], *OPTIONAL]))
    body = orjson.dumps({**VALID[path], field: "NUMBER"}).replace(b'"NUMBER"', number.encode())
    answer = call(secret, path, body)
    error = assert_well_formed(answer)
    if error is not None:
        assert answer.status == 400
        assert error["code"] == "invalid_json" or error["param"] == field


@PROPERTY
@given(case=field_and_value(), stream=st.booleans())
def test_every_field_with_every_json_type_is_served_or_a_400_naming_it(
    secret: str, case: tuple[str, str, Any], stream: bool
) -> None:
    path, field, value = case
    body = {**VALID[path], "stream": stream, field: value}
    answer = call(secret, path, orjson.dumps(body))
    error = assert_well_formed(answer)
    if not ACCEPTS[field](value):
        assert answer.status == 400, (field, value)
        assert error is not None
        assert error["param"] == field
    elif field == "model" and value != "demo":
        assert answer.status == 404
    else:
        assert answer.status == 200, (field, value, answer.body[:300])


header_names = st.sampled_from(
    [b"authorization", b"x-api-key", b"api-key", b"content-length", b"x-request-id", b"content-type", b"x-junk"]
)
header_values = (
    st.binary(max_size=64)
    | st.binary(min_size=4096, max_size=16384)
    | st.integers(min_value=0, max_value=10**30).map(lambda n: str(n).encode())
    | st.sampled_from([b"Bearer ", b"bearer", b"Bearer  afk-", b"-1", b"1" * 5000, b"\xff\xfe", b""])
)


@PROPERTY
@given(
    path=st.sampled_from(PATHS),
    with_key=st.booleans(),
    extra=st.lists(st.tuples(header_names, header_values), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=4),
)
@example(path=PATHS[0], with_key=True, extra=[(b"content-length", b"1" * 5000)], cuts=[])  # int() refuses it
@example(path=PATHS[0], with_key=True, extra=[(b"content-length", b"99999999999999999999999")], cuts=[])
def test_duplicate_and_oversized_headers_and_split_bodies_never_break_the_app(
    secret: str, path: str, with_key: bool, extra: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    headers = [(b"authorization", b"Bearer " + secret.encode())] if with_key else []
    headers += extra
    body = orjson.dumps(VALID[path])
    points = sorted({min(cut, len(body)) for cut in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    answer = call(secret, path, body, headers=headers, chunks=chunks)
    assert_well_formed(answer)
    assert answer.status in (200, 401, 403, 413), answer.body[:300]
