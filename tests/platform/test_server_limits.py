"""Request limits of the real server, as ``make serve`` runs it (issue 8, holes 9, 10 and 16b).

One uvicorn subprocess is started with the exact command line of ``make serve`` (read from ``make -n serve``),
production settings on a throwaway SQLite database, ``REQUEST_HEADER_TIMEOUT_S`` / ``REQUEST_BODY_TIMEOUT_S``
at 1 s and no ``FORWARDED_ALLOW_IPS``; the tests talk to it over raw sockets on 127.0.0.1. Waits are bounded
and generous: the deadlines are behaviour here, not speed.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.live_server import process_group_stop

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SECRET_KEY = "test-only-secret-key-for-the-server-limits-check"
HEADER_TIMEOUT_S = 1
BODY_TIMEOUT_S = 1
WAIT_S = 5.0  # bound for anything the server must do within a 1 s deadline

SEED = """
import django, json
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from accounts.models import User
from keys.services import key_create
user = User.objects.create_user(username="limits", email="limits@example.com", password=None)
far = key_create(owner=user, name="far", ip_allowlist=["10.9.9.9/32"])
local = key_create(owner=user, name="local", ip_allowlist=["127.0.0.1/32"])
print(json.dumps({"far": far.secret, "local": local.secret}))
"""


def make_serve_command(port: int) -> list[str]:
    """The uvicorn command of ``make serve`` for 127.0.0.1:``port`` and one worker, as the shell would run it."""
    dry = subprocess.run(
        ["make", "-s", "-n", "serve", "HOST=127.0.0.1", f"PORT={port}", "WEB_CONCURRENCY=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (line,) = [line for line in dry.stdout.replace("\\\n", " ").splitlines() if "uvicorn apiforge.asgi" in line]
    line = line.replace(".venv/bin/uvicorn", str(VENV_BIN / "uvicorn"), 1)
    return ["sh", "-c", line]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(tmp: Path) -> dict[str, str]:
    skip = ("DATABASE_", "REDIS_", "CELERY_", "FORWARDED_ALLOW_IPS", "MAX_REQUEST_", "REQUEST_", "PROXY_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(skip)}
    env.update(
        APP_ENV="production",
        SECRET_KEY=SECRET_KEY,
        ALLOWED_HOSTS="*",
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
        STATIC_ROOT=str(tmp / "static"),
        CACHE_KEY_PREFIX=f"apiforge-limits-{os.getpid()}",
        LOG_LEVEL="WARNING",
        PYTHONDONTWRITEBYTECODE="1",
        REQUEST_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        REQUEST_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        PROXY_MAX_BODY_BYTES="4096",  # so a small body is "too large" for the proxy: answered before it is read
    )
    return env


@dataclass(frozen=True)
class Server:
    port: int
    keys: dict[str, str]
    log: Path


@pytest.fixture(scope="module", params=["make-serve", "in-process"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server under test: ``make serve``'s command line in a subprocess, and the same protocol in a
    thread of this process (where line coverage is measured, and where no keys are seeded)."""
    if request.param == "in-process":
        yield from _in_process_server()
        return
    yield from _make_serve_server(tmp_path_factory)


def _in_process_server() -> Iterator[Server]:
    from django.test import override_settings

    from apiforge.asgi import application
    from apiforge.server import server_limits
    from tests.live_server import LiveServer

    limits = override_settings(
        REQUEST_HEADER_TIMEOUT_S=HEADER_TIMEOUT_S, REQUEST_BODY_TIMEOUT_S=BODY_TIMEOUT_S, PROXY_MAX_BODY_BYTES=4096
    )
    limits.enable()
    server_limits.cache_clear()  # read again, at the first connection, from the settings above
    live = LiveServer(application).start()  # GuardedHttpToolsProtocol, as make serve runs it
    try:
        yield Server(live.port, {}, Path(os.devnull))
    finally:
        live.stop()
        limits.disable()
        server_limits.cache_clear()


def _make_serve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server-limits")
    env = _server_env(tmp)
    seeded = subprocess.run(
        [sys.executable, "-c", SEED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    keys = json.loads(seeded.stdout.strip().splitlines()[-1])
    port = _free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            make_serve_command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start within 60 s:\n" + log.read_text()
            try:
                status, _, _ = request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.2)
        yield Server(port, keys, log)
    finally:
        process_group_stop(process)


# --- raw HTTP/1.1 over a socket ---


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """One response (status, head, body) read with a Content-Length body; (0, b"", b"") if closed first."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        piece = sock.recv(65536)
        if not piece:
            return 0, b"", raw
        raw += piece
    head, _, body = raw.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return int(head.split(b" ", 2)[1]), head, body


def request(port: int, raw: bytes) -> tuple[int, bytes, bytes]:
    with _connect(port) as sock:
        sock.sendall(raw)
        return _read_response(sock)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed the connection within ``seconds``, what it sent meanwhile)."""
    received = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return True, received
        if not piece:
            return True, received
        received += piece
    return False, received


# --- 9: header size ---


def test_a_64_kib_header_is_refused_with_431_before_it_is_all_sent(server: Server) -> None:
    piece = b"a" * 4096
    pieces = 16  # 64 KiB of one header value, sent 4 KiB at a time
    with _connect(server.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        answer = b""
        sent = 0
        for sent in range(1, pieces + 1):  # noqa: B007 - read after the loop
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                answer = sock.recv(65536)
                break
        if not answer:  # an unguarded server waits for the end of the head, then answers it normally
            sock.sendall(b"\r\n\r\n")
            answer = sock.recv(65536)
        closed, rest = _closed_within(sock, WAIT_S)

    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert sent < pieces, "the server read the whole 64 KiB header before answering"
    body = (answer + rest).partition(b"\r\n\r\n")[2]
    assert json.loads(body)["code"] == "request_header_fields_too_large"
    assert b"connection: close" in answer.lower()
    assert closed


def test_a_15_kib_header_set_is_served(server: Server) -> None:
    headers = b"".join(b"X-Fill-%d: %s\r\n" % (n, b"b" * 3000) for n in range(5))  # ~15,050 bytes in all
    raw = b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
    assert 14 * 1024 < len(raw) < 15 * 1024

    status, _, body = request(server.port, raw)

    assert status == 200, body


def test_the_limit_holds_for_every_request_of_a_keep_alive_connection(server: Server) -> None:
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"c" * (20 * 1024) + b"\r\n\r\n"
    with _connect(server.port) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = _read_response(sock)
            assert status == 200
        sock.sendall(big)
        status, _, _ = _read_response(sock)

    assert status == 431


# --- 10: slow clients ---


def test_a_client_that_stops_in_its_headers_is_cut_off(server: Server) -> None:
    with _connect(server.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed, received = _closed_within(sock, WAIT_S)

    assert closed, f"the connection was still open {WAIT_S} s later (header timeout {HEADER_TIMEOUT_S} s)"
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]


def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    with _connect(server.port) as sock:
        closed, received = _closed_within(sock, WAIT_S)

    assert closed
    assert received == b""


def test_a_client_that_stops_in_its_body_is_cut_off(server: Server) -> None:
    with _connect(server.port) as sock:
        sock.sendall(
            b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"a": "bc'
        )
        closed, received = _closed_within(sock, WAIT_S)

    assert closed, f"the connection was still open {WAIT_S} s later (body timeout {BODY_TIMEOUT_S} s)"
    assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received[:200]


def test_a_head_started_after_an_early_answer_has_a_deadline_too(server: Server) -> None:
    """The proxy refuses an oversized body before reading it (413): the body, the start of another request's
    head, then silence, must not hold the connection (uvicorn's keep-alive timer is off at that point)."""
    with _connect(server.port) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8192\r\n\r\n"
        )
        status, _, _ = _read_response(sock)
        assert status == 413
        sock.sendall(b"x" * 8192 + b"GET /health HTTP/1.1\r\n")
        closed, _ = _closed_within(sock, WAIT_S + HEADER_TIMEOUT_S)

    assert closed


def test_a_request_within_the_deadlines_is_served_normally(server: Server) -> None:
    with _connect(server.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.3)
        sock.sendall(b"Host: x\r\n\r\n")
        status, _, _ = _read_response(sock)

    assert status == 200


# --- 16b: X-Forwarded-For is not trusted unless FORWARDED_ALLOW_IPS says so ---


def _models(server: Server, key: str) -> tuple[int, bytes]:
    raw = (
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "X-Forwarded-For: 10.9.9.9\r\nConnection: close\r\n\r\n"
    ).encode()
    status, _, body = request(server.port, raw)
    return status, body


def test_x_forwarded_for_from_localhost_is_ignored_by_default(server: Server) -> None:
    if not server.keys:
        pytest.skip("keys are seeded for the make-serve server only")
    far_status, far_body = _models(server, server.keys["far"])
    local_status, local_body = _models(server, server.keys["local"])

    assert far_status == 403, far_body
    assert json.loads(far_body)["error"]["code"] == "ip_not_allowed"
    assert local_status == 200, local_body  # the address is the socket's, 127.0.0.1


def test_the_command_line_trusts_no_proxy_unless_configured() -> None:
    (line,) = make_serve_command(8000)[2:]

    assert "--http apiforge.server:GuardedHttpToolsProtocol" in line
    assert '--forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-}"' in line
