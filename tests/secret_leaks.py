"""Secret-leak check over the whole suite: no credential a test creates may reach a log line or an answer.

What counts as a secret:
- API keys (``afk-`` + 43 characters), JWTs and the admin Playground's tokens (``afpg_``), recognised by shape
  wherever they appear;
- passwords, as ``set_password`` and ``check_password`` see them (wrong guesses included);
- upstream API keys and extra-header values, as they are written to the encrypted fields.

What is searched: every log record emitted during the test (message and traceback; not the lines the tests'
own HTTP clients log about the requests they send), and every answer body
the application sends: Django's (``BaseHandler.get_response``/``get_response_async``) and the lean proxy
path's (``proxy.asgi._send``, streams included). The spies only read; behaviour is unchanged.

The rules: an API key or a JWT may appear in exactly one answer, the one that issued it (key create and
rotate, login and refresh) and in no log line; passwords and upstream credentials appear in neither. A hit
fails the test that caused it, naming the kind of secret and where it was seen (never the secret itself);
the terminal summary gives the totals (``secret-leak check: ...``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

API_KEY_SHAPE = re.compile(rb"afk-[A-Za-z0-9_-]{43}")
JWT_SHAPE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
PLAYGROUND_TOKEN_SHAPE = re.compile(rb"afpg_[0-9]+\.[A-Za-z0-9_-]+:[0-9A-Za-z]+:[A-Za-z0-9_-]{16,}")
# The tests' own HTTP clients log the requests the tests make (a test that puts a key in a URL on purpose, to
# see it is not echoed, would find it there): what they log is the test's, not the application's.
CLIENT_LOGGERS = frozenset({"httpx", "httpcore", "openai"})
MIN_SECRET_LENGTH = 8  # shorter "secrets" (test passwords like "x") would match ordinary text


@dataclass
class _Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    credentials: dict[bytes, str] = field(default_factory=dict)  # password / upstream secret -> kind
    issued: dict[bytes, int] = field(default_factory=dict)  # API key or JWT -> answers that carried it
    hits: list[str] = field(default_factory=list)
    bodies: int = 0
    log_lines: int = 0

    def credential(self, value: object, kind: str) -> None:
        if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH and value != "***":
            with self.lock:
                self.credentials.setdefault(value.encode(), kind)

    def answer(self, body: bytes, where: str) -> None:
        if not body:
            return
        with self.lock:
            self.bodies += 1
            shapes = (API_KEY_SHAPE, JWT_SHAPE, PLAYGROUND_TOKEN_SHAPE)
            for token in {found for shape in shapes for found in shape.findall(body)}:
                seen = self.issued.get(token, 0) + 1
                self.issued[token] = seen
                if seen > 1:
                    kind = _kind(token)
                    self.hits.append(f"{kind} issued earlier shown again in an answer of {where}")
            for value, kind in self.credentials.items():
                if value in body:
                    self.hits.append(f"{kind} in an answer of {where}")

    def log_line(self, text: bytes, where: str) -> None:
        with self.lock:
            self.log_lines += 1
            if API_KEY_SHAPE.search(text):
                self.hits.append(f"API key in a log line of {where}")
            if JWT_SHAPE.search(text):
                self.hits.append(f"JWT in a log line of {where}")
            if PLAYGROUND_TOKEN_SHAPE.search(text):
                self.hits.append(f"playground token in a log line of {where}")
            for value, kind in self.credentials.items():
                if value in text:
                    self.hits.append(f"{kind} in a log line of {where}")


def _kind(token: bytes) -> str:
    return "API key" if token.startswith(b"afk-") else "playground token" if token.startswith(b"afpg_") else "JWT"


ledger = _Ledger()


class _LogScanner(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".", 1)[0] in CLIENT_LOGGERS:
            return
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge here
            text = str(record.msg)
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        if record.name == "apiforge.access":
            text += " " + " ".join(str(value) for value in vars(record).values())  # its fields ride as attributes
        ledger.log_line(text.encode("utf-8", "replace"), record.name)


def _install_spies() -> None:
    from django.contrib.auth.base_user import AbstractBaseUser
    from django.core.handlers.base import BaseHandler

    import proxy.asgi
    from proxy.encryption import EncryptedJSONField
    from proxy.models import Upstream

    def content_of(response: Any) -> bytes:
        return b"" if getattr(response, "streaming", False) else bytes(getattr(response, "content", b""))

    get_response = BaseHandler.get_response
    get_response_async = BaseHandler.get_response_async

    def spy_get_response(self: Any, request: Any) -> Any:
        response = get_response(self, request)
        ledger.answer(content_of(response), request.path)
        return response

    async def spy_get_response_async(self: Any, request: Any) -> Any:
        response = await get_response_async(self, request)
        ledger.answer(content_of(response), request.path)
        return response

    BaseHandler.get_response = spy_get_response  # type: ignore[method-assign]
    BaseHandler.get_response_async = spy_get_response_async  # type: ignore[method-assign]

    send = getattr(proxy.asgi, "_send", None)
    if send is not None:

        async def spy_send(response: Any, *args: Any, **kwargs: Any) -> Any:
            ledger.answer(response.body, "the lean proxy path")
            if response.stream is not None:
                response.stream = _scanned(response.stream)
            return await send(response, *args, **kwargs)

        proxy.asgi._send = spy_send  # type: ignore[attr-defined]

    set_password = AbstractBaseUser.set_password
    check_password = AbstractBaseUser.check_password

    def spy_set_password(self: Any, raw_password: str | None) -> None:
        ledger.credential(raw_password, "password")
        set_password(self, raw_password)

    def spy_check_password(self: Any, raw_password: str) -> bool:
        ledger.credential(raw_password, "password")
        return check_password(self, raw_password)

    AbstractBaseUser.set_password = spy_set_password  # type: ignore[method-assign]
    AbstractBaseUser.check_password = spy_check_password  # type: ignore[method-assign]

    api_key = Upstream.api_key

    def spy_api_key(self: Any, value: str) -> None:
        ledger.credential(value, "upstream API key")
        api_key.fset(self, value)  # type: ignore[misc]

    Upstream.api_key = property(api_key.fget, spy_api_key)  # type: ignore[method-assign,assignment]

    prep = EncryptedJSONField.get_prep_value

    def spy_prep(self: Any, value: Any) -> Any:
        if isinstance(value, dict):
            for header_value in value.values():
                ledger.credential(header_value, "upstream header credential")
        return prep(self, value)

    EncryptedJSONField.get_prep_value = spy_prep  # type: ignore[method-assign]


async def _scanned(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in stream:
        ledger.answer(chunk, "a proxied stream")
        yield chunk


def pytest_configure(config: pytest.Config) -> None:
    # Runs after pytest-django has set Django up (its own configure hook is tryfirst).
    from tests.factories import DEFAULT_PASSWORD

    _install_spies()
    ledger.credential(DEFAULT_PASSWORD, "password")  # the factories hash it without set_password


_scanner = _LogScanner()


@pytest.fixture(autouse=True)
def no_secret_leaks() -> Iterator[None]:
    """Fails the test if, while it ran, a secret reached a log line or an answer it must not be in."""
    # Attached per test, not once: Django's LOGGING (dictConfig), which some tests apply again, replaces the
    # root logger's handlers.
    # The access log does not propagate (its own handler writes whole batches): it is scanned too.
    for logger in (logging.getLogger(), logging.getLogger("apiforge.access")):
        if _scanner not in logger.handlers:
            logger.addHandler(_scanner)
    start = len(ledger.hits)
    yield
    new = ledger.hits[start:]
    if new:
        pytest.fail("secret leak(s):\n" + "\n".join(sorted(set(new))), pytrace=False)


def _totals() -> list[int]:
    return [len(ledger.credentials), len(ledger.issued), ledger.bodies, ledger.log_lines, len(ledger.hits)]


_workers_totals: list[list[int]] = []  # under pytest-xdist: what each worker searched (the controller runs no test)


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # a pytest-xdist worker: its totals go to the controller
        output["secret_leaks"] = _totals()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    totals = getattr(node, "workeroutput", {}).get("secret_leaks")
    if totals:
        _workers_totals.append(totals)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    columns = zip(_totals(), *_workers_totals, strict=True)
    credentials, issued, bodies, log_lines, hits = (sum(column) for column in columns)
    terminalreporter.write_line(
        f"secret-leak check: {credentials + issued} secrets tracked ({issued} API keys/JWTs/playground tokens "
        f"issued in answers, {credentials} passwords/upstream credentials), {bodies} answer bodies and "
        f"{log_lines} log lines searched, {hits} leaks found"
    )
