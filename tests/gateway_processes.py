"""Real gateway processes for tests: ``uvicorn apiforge.asgi:application`` with N workers in a subprocess.

``GatewayProcess(tmp, name, workers=2, **env).start()`` runs the production server line (uvloop, httptools with
``apiforge.server``'s request limits, lifespan on) on a free 127.0.0.1 port, on the test's PostgreSQL database
(committed rows only: use ``transaction=True``) and this run's ``CACHE_KEY_PREFIX``, with the ledger written by
the gateway itself (``USAGE_TRANSPORT=database``), metrics in multiprocess mode (any worker's ``/metrics``
shows them all) and its output in ``tmp/<name>.log``. Extra keyword arguments are environment variables
(``REDIS_URL`` included: the test's by default).

Which worker served a call: ``owner(client_port(response))`` is the pid of the worker process holding the
server side of the response's connection (read from ``/proc``, Linux only), while that connection is open.
``stop()`` is ``process_group_stop`` (bounded).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.db import connection

from tests.live_server import process_group_stop

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60.0
_ESTABLISHED, _LISTEN = "01", "0A"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url() -> str:
    """The test database (``test_<name>``) as a ``DATABASE_URL`` for another process."""
    db = connection.settings_dict
    return f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def client_port(response: httpx.Response) -> int:
    """The local (client) port of the connection ``response`` came on."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


def _tcp_sockets() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket."""
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            found.append((int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), fields[3], fields[9]))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(entry))
    return children


class GatewayProcess:
    """One uvicorn server (a supervisor and ``workers`` worker processes); see the module docstring."""

    def __init__(self, tmp: Path, name: str, *, workers: int = 2, **env: str) -> None:
        self.name = name
        self.workers = workers
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        metrics = tmp / f"{name}-metrics"
        metrics.mkdir(exist_ok=True)
        skip = ("DATABASE_", "REDIS_", "CELERY_", "USAGE_", "PROMETHEUS_", "EVENTS_")
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(skip)}
        self.env.update(
            APP_ENV="test",
            DJANGO_SETTINGS_MODULE="apiforge.settings",
            DATABASE_URL=database_url(),
            REDIS_URL=settings.REDIS_URL,
            CACHE_KEY_PREFIX=settings.CACHE_KEY_PREFIX,
            CELERY_TASK_ALWAYS_EAGER="true",
            USAGE_TRANSPORT="database",
            USAGE_SPOOL_DIR=str(tmp / f"{name}-spool"),
            PROMETHEUS_MULTIPROC_DIR=str(metrics),
            ACCESS_LOG="false",
            LOG_LEVEL="WARNING",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.env.update(env)
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> GatewayProcess:
        command = [
            str(BIN / "uvicorn"),
            "apiforge.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--loop",
            "uvloop",
            "--http",
            "apiforge.server:GuardedHttpToolsProtocol",
            "--lifespan",
            "on",
            "--no-access-log",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=settings.BASE_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, self.logs()
            assert time.monotonic() < deadline, f"{self.name} did not start:\n{self.logs()}"
            if len(self.worker_pids()) == self.workers:
                try:
                    if httpx.get(self.url("/health"), timeout=1).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)

    def _serving(self) -> list[int]:
        # With one worker uvicorn serves in its own process; with more, in the supervisor's children.
        assert self.process is not None
        return _children(self.process.pid) if self.workers > 1 else [self.process.pid]

    def worker_pids(self) -> set[int]:
        """The worker processes listening now (those holding the listening socket)."""
        listening = {inode for local, _, state, inode in _tcp_sockets() if local == self.port and state == _LISTEN}
        return {pid for pid in self._serving() if _socket_inodes(pid) & listening}

    def owner(self, port: int) -> int | None:
        """The worker holding the server side of the open connection from client port ``port``, if any."""
        inodes = {
            inode
            for local, remote, state, inode in _tcp_sockets()
            if local == self.port and remote == port and state == _ESTABLISHED
        }
        for pid in self._serving():
            if _socket_inodes(pid) & inodes:
                return pid
        return None

    def logs(self) -> str:
        return f"--- {self.name}\n" + self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process is not None:
            process_group_stop(self.process)
