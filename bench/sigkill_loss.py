"""What a SIGKILL of a gateway process loses: calls answered 200 against the ledger's rows afterwards.

A throwaway stack (SQLite, the embedded transport: the usage thread writes the ledger itself), 8 client
threads for 5 s, then SIGKILL of the gateway. The ledger then holds every call the usage thread had handed
on; what is missing is what it still held: at most ``USAGE_FLUSH_INTERVAL_S`` of traffic (env ``FLUSH``).

    .venv/bin/python bench/sigkill_loss.py            # FLUSH=0.2 to try a shorter interval
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run import free_port  # noqa: E402

SECONDS = 5
CLIENTS = 8


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    database = tmp / "db.sqlite3"
    upstream_port, gateway_port = free_port(), free_port()
    python = str(ROOT / ".venv/bin/python")
    mock = subprocess.Popen(
        [python, str(HERE / "mock_upstream.py"), "--port", str(upstream_port)], start_new_session=True
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DATABASE_", "REDIS_", "CELERY_"))}
    env.update(
        APP_ENV="production",
        SECRET_KEY="sigkill-loss-" + "x" * 40,
        ALLOWED_HOSTS="*",
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"sqlite:///{database}",
        LOG_LEVEL="WARNING",
        ACCESS_LOG="false",
        USAGE_FLUSH_INTERVAL_S=os.environ.get("FLUSH", "1.0"),
        USAGE_SPOOL_DIR=str(tmp / "spool"),
    )
    seeded = subprocess.run(
        [python, str(HERE / "stack_seed.py"), "--upstream-url", f"http://127.0.0.1:{upstream_port}/v1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seed = json.loads(seeded.stdout.strip().splitlines()[-1])
    gateway = subprocess.Popen(
        [str(ROOT / ".venv/bin/uvicorn"), "apiforge.asgi:application", "--port", str(gateway_port), "--lifespan", "on",
         "--loop", "uvloop", "--http", "apiforge.server:GuardedHttpToolsProtocol", "--no-access-log",
         "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(150):
            try:
                if httpx.get(f"http://127.0.0.1:{gateway_port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        answered = [0] * CLIENTS
        stop = threading.Event()

        def load(slot: int) -> None:
            headers = {"Authorization": f"Bearer {seed['api_key']}"}
            body = {"model": seed["model"], "messages": [{"role": "user", "content": "hi"}]}
            with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}/v1", headers=headers) as client:
                while not stop.is_set():
                    try:
                        if client.post("/chat/completions", json=body).status_code == 200:
                            answered[slot] += 1
                    except httpx.HTTPError:
                        return

        threads = [threading.Thread(target=load, args=(slot,)) for slot in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(SECONDS)
        os.killpg(gateway.pid, signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join()
        with sqlite3.connect(database) as db:
            (rows,) = db.execute("SELECT count(*) FROM gateway_stats_usagerecord").fetchone()
        total = sum(answered)
        rate = total / SECONDS
        print(
            f"flush={env['USAGE_FLUSH_INTERVAL_S']}s answered_200={total} ledger_rows={rows} lost={total - rows}"
            f" (~{rate:.0f} calls/s: {(total - rows) / rate:.2f} s of traffic)"
        )
    finally:
        os.killpg(mock.pid, signal.SIGTERM)
        if gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
