"""A fake OpenAI-compatible upstream: a real HTTP server on 127.0.0.1 for the proxy tests.

``FakeUpstream`` runs an aiohttp server on a random free port in a background
thread with its own event loop. Tests point an upstream's ``base_url`` at
``fake.base_url`` ("http://127.0.0.1:PORT/v1") and then:

- turn knobs between requests: ``chunks``, ``chunk_delay``, ``latency``,
  ``fail_mid_stream``, ``embedding_dim``, ``models``; ``fail_next()`` and
  ``hang_next()`` for the next requests; ``reset()`` to go back to defaults;
- read what it received: ``requests`` (method, path, lower-case headers, JSON
  body, the model asked for), ``disconnects`` and the ``disconnected`` event;
- compute what it answers with the ``expected_*`` static methods (answers are
  deterministic: "echo: <last user message>", and tokens are counted as
  whitespace-separated words).

Endpoints (under ``/v1``): POST ``chat/completions`` (JSON or SSE),
POST ``completions`` (JSON or SSE), POST ``embeddings``, GET ``models``,
GET ``models/{model}``. Anything else is a 404 with an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_MODELS = ("fake-chat", "fake-embedding")
HANG_SECONDS = 3600.0  # "forever" for a test; stop() ends it at once
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


# --- Deterministic answers (shared by the server and the tests' expectations) ---


def _words(text: str) -> int:
    return len(text.split())


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("text"))
    return ""


def _split(text: str, n: int) -> list[str]:
    """``text`` cut into exactly ``n`` consecutive pieces (some empty when ``text`` is shorter than ``n``)."""
    n = max(n, 1)
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _embedding_inputs(value: Any) -> list[Any]:
    """One item per embedding: a string, a list of strings, a token list or a list of token lists."""
    if isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        return [value]
    if isinstance(value, list):
        return value
    return [value]


def _input_tokens(item: Any) -> int:
    if isinstance(item, list):  # already tokens
        return len(item)
    return _words(str(item))


# --- What was received ---


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    json: Any  # the parsed body; None when there was none or it was not JSON
    body: bytes
    query: dict[str, str] = field(default_factory=dict)
    status: int | None = None  # the status the fake answered (None while still answering)
    disconnected: bool = False  # the client went away before the answer was complete

    @property
    def model(self) -> Any:
        """The ``model`` field of the JSON body (the proxy rewrites it to the deployment's model)."""
        return self.json.get("model") if isinstance(self.json, dict) else None

    @property
    def stream(self) -> bool:
        return bool(isinstance(self.json, dict) and self.json.get("stream"))


@dataclass
class _Failure:
    status: int
    body: bytes
    content_type: str


class FakeUpstream:
    """A fake OpenAI-compatible server on 127.0.0.1; see the module docstring.

    Knobs (plain attributes, settable between requests from the test thread):
    ``chunks`` content chunks per stream (default 3), ``chunk_delay`` seconds
    between chunks, ``latency`` seconds before answering, ``fail_mid_stream``
    (``None`` or k: after k content chunks the connection is closed without
    finishing the stream), ``embedding_dim`` (default 8, or the request's
    ``dimensions``), ``models`` (what GET /v1/models lists).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._ids = itertools.count(1)
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self.disconnected = threading.Event()
        self.reset()

    # --- lifecycle ---

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, with ``/v1``: what an upstream's ``base_url`` is set to."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("FakeUpstream did not start in time")
        if self._startup_error is not None:
            raise RuntimeError("FakeUpstream failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        """Stop serving; hanging and streaming answers end at once. Bounded: never waits more than a few seconds."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may close between the check and the call
                loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("FakeUpstream did not stop in time")
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as exc:  # reported to start() when it happens before ready
            self._startup_error = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a handler is cancelled when its client goes away, which is how a
        # disconnect is seen while the fake sleeps (latency, hang, chunk delay) and not only on a write.
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # --- knobs ---

    def reset(self) -> None:
        """Back to the defaults; forget received requests, disconnects and pending failures."""
        with self._lock:
            self.chunks = 3
            self.chunk_delay = 0.0
            self.latency = 0.0
            self.fail_mid_stream: int | None = None
            self.embedding_dim = 8
            self.models: list[str] = list(DEFAULT_MODELS)
            self._failures: list[_Failure] = []
            self._hangs = 0
            self.requests = []
            self.disconnects = 0
            self.disconnected.clear()

    def fail_next(self, n: int = 1, status: int = 500, body: Any = None, *, content_type: str | None = None) -> None:
        """The next ``n`` requests answer ``status`` with ``body``: an OpenAI error body by default,
        a dict (sent as JSON), or str/bytes sent as they are (``content_type`` defaults to JSON)."""
        if body is None:
            body = {
                "error": {
                    "message": f"fake upstream failure ({status})",
                    "type": "server_error" if status >= 500 else "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        raw = json.dumps(body).encode() if isinstance(body, dict | list) else body
        raw = raw.encode() if isinstance(raw, str) else raw
        with self._lock:
            self._failures.extend(_Failure(status, raw, content_type or "application/json") for _ in range(n))

    def hang_next(self, n: int = 1) -> None:
        """The next ``n`` requests get no answer for an hour (until the client gives up or ``stop()``)."""
        with self._lock:
            self._hangs += n

    # --- observations ---

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            if not self.requests:
                raise AssertionError("the fake upstream received no request")
            return self.requests[-1]

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Received requests whose path is ``path`` (e.g. "/v1/chat/completions")."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Wait (bounded) until at least ``n`` requests have arrived; True when they did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= n:
                return True
            time.sleep(0.01)
        return len(self.requests) >= n

    def wait_for_disconnect(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until a client has gone away mid-answer; True when one did."""
        return self.disconnected.wait(timeout)

    # --- expected answers (pure functions of the request) ---

    @staticmethod
    def expected_content(messages: list[dict[str, Any]]) -> str:
        """The chat answer's content: "echo: " + the last user message's text."""
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        return "echo: " + (_content_text(last_user.get("content")) if last_user else "")

    @staticmethod
    def expected_usage(messages: list[dict[str, Any]]) -> dict[str, int]:
        """Chat usage: prompt tokens = words in all messages' content; completion tokens = words of the answer."""
        prompt = sum(_words(_content_text(m.get("content"))) for m in messages)
        return _usage(prompt, _words(FakeUpstream.expected_content(messages)))

    @staticmethod
    def expected_chunks(messages: list[dict[str, Any]], chunks: int = 3) -> list[str]:
        """The content pieces of a streamed chat answer, in order (joined, they are ``expected_content``)."""
        return _split(FakeUpstream.expected_content(messages), chunks)

    @staticmethod
    def expected_completion_text(prompt: str) -> str:
        return "echo: " + prompt

    @staticmethod
    def expected_completion_usage(prompt: str | list[str]) -> dict[str, int]:
        """Completions usage: one choice per prompt; words of the prompts and of the answers."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        completion = sum(_words(FakeUpstream.expected_completion_text(p)) for p in prompts)
        return _usage(sum(_words(p) for p in prompts), completion)

    @staticmethod
    def expected_embedding_usage(value: Any) -> dict[str, int]:
        """Embeddings usage: words (or tokens, for token lists) of every input; no completion tokens."""
        tokens = sum(_input_tokens(item) for item in _embedding_inputs(value))
        return {"prompt_tokens": tokens, "total_tokens": tokens}

    @staticmethod
    def expected_embedding(item: Any, dim: int = 8) -> list[float]:
        """The vector for one input: values k/1024 in [-1, 1), exact in float32 (so base64 round-trips)."""
        seed = hashlib.sha256(json.dumps(item).encode()).digest()
        while len(seed) < dim:
            seed += hashlib.sha256(seed).digest()
        return [(seed[i] - 128) / 128 for i in range(dim)]

    # --- request handling ---

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            json=parsed,
            body=body,
            query=dict(request.query),
        )
        with self._lock:
            self.requests.append(record)
            failure = self._failures.pop(0) if self._failures else None
            hang = self._hangs > 0
            if hang:
                self._hangs -= 1
        try:
            return await self._answer(request, record, failure, hang)
        except asyncio.CancelledError:
            # Cancelled by aiohttp because the client went away (not by our own shutdown).
            if not self._stopping:
                self._client_gone(record)
            raise

    @property
    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _client_gone(self, record: RecordedRequest) -> None:
        with self._lock:
            if record.disconnected:
                return
            record.disconnected = True
            self.disconnects += 1
        self.disconnected.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server stops."""
        if seconds <= 0:
            return
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _answer(
        self, request: web.Request, record: RecordedRequest, failure: _Failure | None, hang: bool
    ) -> web.StreamResponse:
        if hang:
            await self._sleep(HANG_SECONDS)
            return self._json(record, 503, _error("fake upstream stopped", "server_error"))
        await self._sleep(self.latency)
        if failure is not None:
            record.status = failure.status
            return web.Response(status=failure.status, body=failure.body, content_type=failure.content_type)

        path = request.path.rstrip("/")
        if path == "/v1/chat/completions" and request.method == "POST":
            return await self._chat(request, record)
        if path == "/v1/completions" and request.method == "POST":
            return await self._completions(request, record)
        if path == "/v1/embeddings" and request.method == "POST":
            return self._embeddings(record)
        if path == "/v1/models" and request.method == "GET":
            return self._json(record, 200, {"object": "list", "data": [_model(m) for m in self.models]})
        if path.startswith("/v1/models/") and request.method == "GET":
            name = path.removeprefix("/v1/models/")
            if name in self.models:
                return self._json(record, 200, _model(name))
            return self._json(record, 404, _error(f"The model '{name}' does not exist", "invalid_request_error"))
        return self._json(record, 404, _error(f"Unknown path {request.method} {request.path}", "invalid_request_error"))

    def _json(self, record: RecordedRequest, status: int, payload: Any) -> web.Response:
        record.status = status
        return web.json_response(payload, status=status)

    def _bad_request(self, record: RecordedRequest, message: str) -> web.Response:
        return self._json(record, 400, _error(message, "invalid_request_error"))

    async def _chat(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        req = record.json
        if not isinstance(req, dict) or not isinstance(req.get("messages"), list) or not req.get("model"):
            return self._bad_request(record, "model and messages are required")
        messages = req["messages"]
        content = self.expected_content(messages)
        usage = self.expected_usage(messages)
        cid, created, model = f"chatcmpl-fake{next(self._ids)}", int(time.time()), req["model"]
        if not req.get("stream"):
            return self._json(
                record,
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content, "refusal": None},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "system_fingerprint": "fp_fake", "choices": [choice]}

        events = [(chunk({"role": "assistant", "content": ""}), False)]
        events += [(chunk({"content": piece}), True) for piece in _split(content, self.chunks)]
        events.append((chunk({}, "stop"), False))
        tail = [{**base, "choices": [], "usage": usage}] if _include_usage(req) else []
        return await self._stream(request, record, events, tail)

    async def _completions(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        req = record.json
        if (
            not isinstance(req, dict)
            or not req.get("model")
            or not (isinstance(req.get("prompt"), str) or _all_str(req.get("prompt")))
        ):
            return self._bad_request(record, "model and prompt (a string or a list of strings) are required")
        prompts = [req["prompt"]] if isinstance(req["prompt"], str) else req["prompt"]
        usage = self.expected_completion_usage(prompts)
        cid, created, model = f"cmpl-fake{next(self._ids)}", int(time.time()), req["model"]
        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        if not req.get("stream"):
            choices = [
                {"index": i, "text": self.expected_completion_text(p), "logprobs": None, "finish_reason": "stop"}
                for i, p in enumerate(prompts)
            ]
            return self._json(record, 200, {**base, "choices": choices, "usage": usage})

        def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        events: list[tuple[dict[str, Any], bool]] = []
        for i, p in enumerate(prompts):
            events += [(chunk(i, piece), True) for piece in _split(self.expected_completion_text(p), self.chunks)]
            events.append((chunk(i, "", "stop"), False))
        tail = [{**base, "choices": [], "usage": usage}] if _include_usage(req) else []
        return await self._stream(request, record, events, tail)

    def _embeddings(self, record: RecordedRequest) -> web.Response:
        req = record.json
        if not isinstance(req, dict) or not req.get("model") or req.get("input") in (None, "", []):
            return self._bad_request(record, "model and input are required")
        dim = int(req.get("dimensions") or self.embedding_dim)
        as_base64 = req.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(_embedding_inputs(req["input"])):
            vector = self.expected_embedding(item, dim)
            encoded: Any = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        payload = {
            "object": "list",
            "data": data,
            "model": req["model"],
            "usage": self.expected_embedding_usage(req["input"]),
        }
        return self._json(record, 200, payload)

    async def _stream(
        self,
        request: web.Request,
        record: RecordedRequest,
        events: list[tuple[dict[str, Any], bool]],
        tail: list[dict[str, Any]],
    ) -> web.StreamResponse:
        """Send SSE events one write at a time, ``chunk_delay`` apart; break the connection mid-way when asked.

        ``events`` are (chunk, carries content) pairs; ``tail`` is the usage chunk, sent with ``[DONE]``.
        """
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        record.status = 200
        break_after = self.fail_mid_stream
        try:
            await response.prepare(request)
            content_sent = 0
            for index, (event, is_content) in enumerate(events):
                if break_after is not None and is_content and content_sent >= break_after:
                    # Drop the connection without the terminating chunk: the client sees a broken body.
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if index > 0:
                    await self._sleep(self.chunk_delay)
                await response.write(_sse(event))
                content_sent += is_content
            await response.write(b"".join(_sse(e) for e in tail) + b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError too: the write found the client gone
            self._client_gone(record)
        return response


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _include_usage(req: dict[str, Any]) -> bool:
    options = req.get("stream_options")
    return bool(isinstance(options, dict) and options.get("include_usage"))


def _all_str(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"}


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
