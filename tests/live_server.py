"""Run an ASGI application under uvicorn in a background thread of the test process.

``LiveServer(app, host, port)`` serves ``app`` the way production does (uvloop, httptools with
``apiforge.server``'s request limits, lifespan on) on a real socket, so tests can talk to it with any HTTP
client (the official ``openai`` package included). ``port=0`` picks a free port;
``base_url`` is known after ``start()``. Start and stop waits are bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn

from apiforge.server import GuardedHttpToolsProtocol

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 5.0

_running: set[LiveServer] = set()


def live_requests_settle(timeout: float = SETTLE_TIMEOUT_S) -> bool:
    """Wait (bounded) until no live server in this process is still running a request's ASGI call.

    A streamed answer is accounted after its last chunk has been sent, so a client can have read the whole
    stream while the server is still finishing the call: whatever the call does last (its usage event) is
    done once this returns True. False when a request is still running after ``timeout`` (a test that left
    one hanging on purpose).
    """
    deadline = time.monotonic() + timeout
    while any(server.requests_running() for server in list(_running)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class LiveServer:
    """One uvicorn server on ``host:port`` in a daemon thread with its own event loop."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._config_overrides = config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def requests_running(self) -> int:
        """How many requests' ASGI calls are running now (uvicorn's own task set)."""
        return 0 if self._server is None else len(self._server.server_state.tasks)

    def start(self) -> LiveServer:
        if self._thread is not None:
            raise RuntimeError("LiveServer already started")
        # Bind here, not in uvicorn: the port is known at once and no other process can take it meanwhile.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        options: dict[str, Any] = {
            "loop": "uvloop",
            "http": GuardedHttpToolsProtocol,  # what `make serve` runs: httptools with request limits
            "lifespan": "on",
            "access_log": False,
            "log_level": "warning",
            "log_config": None,  # leave the test process's logging alone (errors still reach the root logger)
            "timeout_graceful_shutdown": 3,
            **self._config_overrides,
        }
        config = uvicorn.Config(self.app, **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"live-server-{self.port}", daemon=True)
        self._thread.start()
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the live server stopped during startup (lifespan failed?): {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the live server did not start within {START_TIMEOUT_S} s")
            time.sleep(0.01)
        return self

    def _run(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            # Not the main thread: uvicorn installs no signal handlers here.
            self._server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit included: reported by start()
            self._error = exc
        finally:
            sock.close()

    def stop(self) -> None:
        """Graceful shutdown (lifespan shutdown runs); forced after the server's grace + ``STOP_TIMEOUT_S`` / 2."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        _running.discard(self)
        server.should_exit = True
        # uvicorn's own grace (timeout_graceful_shutdown) runs first, then the lifespan shutdown
        thread.join((server.config.timeout_graceful_shutdown or 0) + STOP_TIMEOUT_S / 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT_S / 2)
        self._thread = None
        if thread.is_alive():
            raise RuntimeError("the live server did not stop in time")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Fixtures (re-exported by tests/proxy/conftest.py; import them where a conftest does not reach) ---


@pytest.fixture
def live_server_factory() -> Iterator[Callable[[Any], LiveServer]]:
    """Start any ASGI app on a free 127.0.0.1 port: ``live_server_factory(app) -> LiveServer``; all stopped at the end.

    Whatever the app reads from the database needs ``transactional_db`` (the server runs in another thread and
    only sees committed rows).
    """
    servers: list[LiveServer] = []

    def start(app: Any, **config: Any) -> LiveServer:
        server = LiveServer(app, "127.0.0.1", 0, **config)
        servers.append(server)
        return server.start()

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def live_gateway(transactional_db: None, live_server_factory: Callable[[Any], LiveServer]) -> LiveServer:
    """The real ``apiforge.asgi:application`` under uvicorn (uvloop, httptools, lifespan on) on a free port.

    Attributes: ``base_url`` ("http://127.0.0.1:PORT"), ``url(path)``, ``host``, ``port``. Stopped (lifespan
    shutdown included) at the end of the test, with bounded waits.

    It depends on ``transactional_db``: the server answers from another thread with its own database
    connection, so rows must be committed to be seen (the plain ``db`` fixture's rolled-back transaction is
    invisible to it). Tests create their users, keys and models normally, then call the server.
    """
    from apiforge.asgi import application  # imported late: Django must be set up, and proxy.asgi may change

    return live_server_factory(application)


def process_group_stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (the uvicorn supervisor and its workers); SIGKILL after 15 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
