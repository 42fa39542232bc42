"""The project's proxy benchmark: what the gateway costs compared with calling the upstream directly.

By default it builds a whole throwaway stack and measures it:

1. a SQLite database under /tmp, migrated, with one upstream, one model, one route and two
   API keys (``bench/stack_seed.py``, run with the same ``SECRET_KEY`` as the server): one
   without limits and one whose rpm, tpm and concurrency limits never trigger (10,000,000 rpm,
   10,000,000,000 tpm, 100,000 in flight), for the limited modes;
2. the fake upstream ``bench/mock_upstream.py`` and wrk, pinned to ``--load-cpus`` (CPU 1);
3. the gateway (``apiforge.asgi:application``) under ``--server`` with ``--workers``
   processes, pinned to ``--cpus`` (CPU 0 for one worker);
4. wrk against the upstream (direct) and through the gateway (proxy), alternately
   (A B A B ...) after a discarded warm-up, for non-streamed and streamed chat
   completions (``--chunks`` content chunks plus ``stream_options.include_usage``)
   and, in the ``gw`` mode, the non-streamed call through the generic route ``bench``
   (``/gw/bench/...``, key auth, the mock as its one target) instead of ``/v1/``,
   at concurrency ``-c`` and, with ``--c1-duration``, at concurrency 1;
   the limited modes (``--modes limited,limited-stream``, and ``limited-gw``) make the
   ``nonstream`` / ``stream`` / ``gw`` call with the limited key, each round running direct,
   the unlimited key and the limited key (the last two swapped every other round), so the
   limiter's cost is measured against the same rounds' unlimited key;
5. a table (RPS, p50/p99, proxy/direct ratio, added latency, peak RSS of the
   gateway's processes; in a limited mode's row the proxy is the limited key), with limited
   modes a second one (limited key / unlimited key RPS ratio, added p50/p99: issue 12 asks
   >= 0.75 non-stream and stream, <= 0.8 ms at c=1) and a ``RESULT`` line; then it stops what it
   started, by PID.

The limiter is in-process unless ``--redis URL`` (``--redis-url``) gives the gateway
``REDIS_URL``: then its cache and limiter use that Redis (one round trip per limited call)
under a ``CACHE_KEY_PREFIX`` of the run's own, whose keys are deleted at the end; the ledger
is written as embedded unless ``--celery-worker`` consumes it from the Redis broker.

``--against URL --api-key K --model M`` measures an already running gateway
instead (add ``--upstream URL`` for the direct side, ``--rss-pid`` for memory and
``--limited-api-key K`` for the limited modes).

Only the standard library, ``wrk`` and ``taskset``; the servers come from the
virtualenv of the python running this script (``--venv`` to pick another; its ``redis``
client deletes a ``--redis`` run's keys). Figures from a shared 2-core machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUA = HERE / "wrk_post.lua"
SECRET_KEY = "bench-only-secret-key-never-used-anywhere-else-0123456789abcdef"  # noqa: S105 - throwaway stack
SERVERS = ("uvicorn", "granian", "gunicorn", "daphne")
UVICORN_HTTP = "apiforge.server:GuardedHttpToolsProtocol"  # what `make serve` and the image run
STREAM_CHECK_CHUNKS = 8
STREAM_CHECK_DELAY_MS = 20


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- processes we start (and stop, by PID) ----------------------------------------------------------
@dataclass
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group we created for it, then SIGKILL if it lingers."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        # Worker processes left behind by a master that died first share its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def start(name: str, cmd: list[str], *, cpus: str, env: dict[str, str], logdir: Path) -> Started:
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    log_path = logdir / f"{name}.log"
    with log_path.open("wb") as out:
        # A session of its own, so stop() can reach the workers a server forks without looking them up.
        popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    log(f"started {name} (pid {popen.pid}, cpus {cpus or 'any'}): {' '.join(cmd)}")
    return Started(name, popen, log_path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: Started | None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise SystemExit(f"{proc.name} exited during startup:\n{proc.tail()}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - our own local URL
                if answer.status == 200:
                    return
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {timeout:.0f} s" + (f":\n{proc.tail()}" if proc else ""))


# --- memory -----------------------------------------------------------------------------------------
def _process_tree(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@dataclass
class RssSampler:
    """VmRSS of some processes and their descendants, every ``interval`` seconds, in a thread."""

    roots: list[int]
    interval: float = 0.5
    first: dict[int, float] = field(default_factory=dict)
    peak: dict[int, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for pid in _process_tree(self.roots):
            mib = _rss_mib(pid)
            if mib is None:
                continue
            self.names.setdefault(pid, _cmdline(pid)[:80])
            self.first.setdefault(pid, mib)
            self.peak[pid] = max(self.peak.get(pid, 0.0), mib)
            self.last[pid] = mib

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def lines(self) -> list[str]:
        out = [f"{'pid':>8} {'start MiB':>10} {'peak MiB':>10} {'end MiB':>10}  command"]
        for pid in sorted(self.peak):
            out.append(
                f"{pid:>8} {self.first[pid]:>10.1f} {self.peak[pid]:>10.1f} {self.last[pid]:>10.1f}  {self.names[pid]}"
            )
        out.append(f"{'total':>8} {'':>10} {self.total_peak():>10.1f}")
        return out

    def total_peak(self) -> float:
        return sum(self.peak.values())


# --- load ---------------------------------------------------------------------------------------------
BASE_MODES = ("nonstream", "stream", "gw")
# A limited mode makes its base mode's call with the limited key (rpm + tpm + concurrency limits that never
# trigger) and, in the same rounds, with the unlimited key: limited / unlimited is the limiter's cost.
LIMITED_MODES = {"limited": "nonstream", "limited-stream": "stream", "limited-gw": "gw"}
MODES = (*BASE_MODES, *LIMITED_MODES)


def base_mode(mode: str) -> str:
    """The call a mode makes: ``limited-stream`` makes the ``stream`` call (with the limited key)."""
    return LIMITED_MODES.get(mode, mode)


@dataclass(frozen=True)
class Target:
    name: str  # direct | proxy (the unlimited key) | limited (the limited key)
    url: str  # the full .../chat/completions URL
    api_key: str
    model: str
    # The `gw` mode's URL: the same non-streamed call through a generic /gw/ route (direct: the upstream again).
    gw_url: str = ""

    def url_for(self, mode: str) -> str:
        return self.gw_url if base_mode(mode) == "gw" and self.gw_url else self.url


def targets_for(mode: str, targets: list[Target]) -> list[Target]:
    """Who a mode measures: direct and proxy, plus the limited key in the limited modes."""
    return [target for target in targets if target.name != "limited" or mode in LIMITED_MODES]


def chat_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def chat_body(model: str, stream: bool, content: str = "Say hello") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def wrk(url: str, body_file: Path, api_key: str, concurrency: int, seconds: int, cpus: str) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "-s", str(LUA), url]
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_API_KEY": api_key}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 90, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCHWRK "):
            return dict(json.loads(line[len("BENCHWRK ") :]))
    raise SystemExit(f"wrk failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def preflight(target: Target, url: str = "") -> float:
    """One JSON request; the milliseconds it took. Exits with the answer when it is not a completion."""
    data = json.dumps(chat_body(target.model, stream=False)).encode()
    headers = {"content-type": "application/json"}
    if target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    url = url or target.url
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - local URL
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            body = json.loads(answer.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"pre-flight {url}: HTTP {error.code}: {error.read()[:300]!r}") from None
    if "choices" not in body or "usage" not in body:
        raise SystemExit(f"pre-flight {url}: unexpected answer {body!r:.300}")
    return (time.perf_counter() - started) * 1000


def limiter_check(target: Target) -> str:
    """The x-ratelimit-* headers of one answer to the limited key: whether the limiter checks its calls."""
    data = json.dumps(chat_body(target.model, stream=False)).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {target.api_key}"}
    request = urllib.request.Request(target.url, data=data, headers=headers)  # noqa: S310 - local URL
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
        answer.read()
        found = {
            name.lower(): value for name, value in answer.headers.items() if name.lower().startswith("x-ratelimit")
        }
    if not found:
        return "WARNING: no x-ratelimit-* headers in its answer: are its limits checked?"
    return "limits checked: " + ", ".join(f"{name}={value}" for name, value in sorted(found.items()))


def stream_check(target: Target) -> str:
    """Ask our mock for chunks spaced STREAM_CHECK_DELAY_MS apart: a buffering proxy delivers them at once."""
    url = urllib.parse.urlsplit(target.url)
    content = f"bench:chunk_delay_ms={STREAM_CHECK_DELAY_MS}"
    body = json.dumps(chat_body(target.model, stream=True, content=content))
    headers = {"content-type": "application/json"}
    if target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=30)
    try:
        started = time.perf_counter()
        connection.request("POST", url.path, body=body, headers=headers)
        answer = connection.getresponse()
        arrivals: list[float] = []
        raw = b""
        while piece := answer.read1(65536):
            raw += piece
            if b'"content":"hello' in piece:
                arrivals.append((time.perf_counter() - started) * 1000)
    finally:
        connection.close()
    spread = arrivals[-1] - arrivals[0] if arrivals else 0.0
    expected = (STREAM_CHECK_CHUNKS - 1) * STREAM_CHECK_DELAY_MS
    verdict = "OK" if spread >= expected * 0.6 and raw.endswith(b"data: [DONE]\n\n") and b'"usage"' in raw else "FAIL"
    first = f"{arrivals[0]:.1f}" if arrivals else "-"
    return f"{verdict}: first content after {first} ms, content spread {spread:.0f} ms (sent over {expected} ms)"


@dataclass
class Series:
    runs: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(run[key] for run in self.runs)

    @property
    def errors(self) -> int:
        return int(sum(run["errors"] for run in self.runs))

    @property
    def rps_range(self) -> str:
        values = [run["rps"] for run in self.runs]
        return f"{min(values):.0f}..{max(values):.0f}"


def measure(args: argparse.Namespace, targets: list[Target], sampler: RssSampler | None) -> dict[str, Series]:
    """Warm-up, then alternating rounds, per pass (c, c=1) and mode; keyed "pass/mode/target"."""
    bodies: dict[tuple[str, str], Path] = {}
    for mode in args.modes:
        for target in targets_for(mode, targets):
            path = args.workdir / f"body_{target.name}_{mode}.json"
            path.write_text(json.dumps(chat_body(target.model, stream=base_mode(mode) == "stream")))
            bodies[target.name, mode] = path
    mode_width = max(9, *(len(mode) for mode in args.modes))
    name_width = max(len(target.name) for target in targets)
    passes = [(f"c{args.concurrency}", args.concurrency, args.duration)]
    if args.c1_duration > 0:
        passes.append(("c1", 1, args.c1_duration))
    results: dict[str, Series] = {}
    for stage, concurrency, seconds in passes:
        for mode in args.modes:
            for target in targets_for(mode, targets):
                if args.warmup > 0:
                    url = target.url_for(mode)
                    wrk(url, bodies[target.name, mode], target.api_key, concurrency, args.warmup, args.load_cpus)
            for round_number in range(1, args.rounds + 1):
                in_order = targets_for(mode, targets)
                if round_number % 2 == 0 and len(in_order) == 3:
                    # direct, unlimited, limited, then direct, limited, unlimited ...: a drift over the run (the
                    # ledger growing, the VM's neighbours) favours neither key.
                    in_order = [in_order[0], in_order[2], in_order[1]]
                for target in in_order:
                    body = bodies[target.name, mode]
                    run = wrk(target.url_for(mode), body, target.api_key, concurrency, seconds, args.load_cpus)
                    results.setdefault(f"{stage}/{mode}/{target.name}", Series()).runs.append(run)
                    log(
                        f"  {stage:<4} {mode:<{mode_width}} round {round_number} {target.name:<{name_width}} "
                        f"rps={run['rps']:>9.1f} "
                        f"p50={run['p50_ms']:>7.2f} ms p99={run['p99_ms']:>7.2f} ms errors={int(run['errors'])}"
                    )
    if sampler is not None:
        sampler.sample()
    return results


def _pair(base: Series, other: Series) -> tuple[float, float, float]:
    """other / base RPS, and other - base p50 and p99 (medians over rounds)."""
    return (
        other.median("rps") / base.median("rps"),
        other.median("p50_ms") - base.median("p50_ms"),
        other.median("p99_ms") - base.median("p99_ms"),
    )


def report(args: argparse.Namespace, results: dict[str, Series], sampler: RssSampler | None) -> dict[str, Any]:
    mode_width = max(9, *(len(mode) for mode in args.modes))
    header = (
        f"{'pass':<5} {'mode':<{mode_width}} {'direct RPS':>10} {'proxy RPS':>10} {'proxy min..max':>15} {'ratio':>6} "
        f"{'direct p50/p99 ms':>18} {'proxy p50/p99 ms':>18} {'added p50/p99 ms':>18} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    server = "external" if args.against else args.server
    result: dict[str, Any] = {"label": args.label, "server": server, "workers": 0 if args.against else args.workers}
    result["c"] = args.concurrency
    passes = dict.fromkeys(key.split("/")[0] for key in results)
    for stage in passes:
        for mode in args.modes:
            # A limited mode's row is the limited key against direct; the unlimited key is in the table below.
            proxy = results.get(f"{stage}/{mode}/{'limited' if mode in LIMITED_MODES else 'proxy'}")
            direct = results.get(f"{stage}/{mode}/direct")
            if proxy is None:
                continue
            prefix = ("" if stage != "c1" else "c1_") + mode.replace("-", "_")
            result[f"{prefix}_rps"] = round(proxy.median("rps"), 1)
            result[f"{prefix}_p50_ms"] = round(proxy.median("p50_ms"), 2)
            result[f"{prefix}_errors"] = proxy.errors + (direct.errors if direct else 0)
            proxy_lat = f"{proxy.median('p50_ms'):.2f} / {proxy.median('p99_ms'):.2f}"
            if direct is not None:
                ratio, added50, added99 = _pair(direct, proxy)
                result[f"{prefix}_direct_rps"] = round(direct.median("rps"), 1)
                result[f"{prefix}_ratio"] = round(ratio, 4)
                result[f"{prefix}_added_p50_ms"] = round(added50, 2)
                direct_cols = (
                    f"{direct.median('rps'):>10.1f}",
                    f"{ratio:>6.3f}",
                    f"{direct.median('p50_ms'):.2f} / {direct.median('p99_ms'):.2f}",
                    f"{added50:+.2f} / {added99:+.2f}",
                )
            else:
                direct_cols = (f"{'-':>10}", f"{'-':>6}", "-", "-")
            lines.append(
                f"{stage:<5} {mode:<{mode_width}} {direct_cols[0]} {proxy.median('rps'):>10.1f} {proxy.rps_range:>15} "
                f"{direct_cols[1]} {direct_cols[2]:>18} {proxy_lat:>18} {direct_cols[3]:>18} "
                f"{result[f'{prefix}_errors']:>6}"
            )
    print("\n".join(lines))
    limited_lines = limited_report(args, results, passes, result)
    if limited_lines:
        print("\n" + "\n".join(limited_lines))
    if sampler is not None:
        print("\nRSS of the gateway's processes (sampled every 0.5 s):")
        print("\n".join(sampler.lines()))
        result["rss_total_peak_mib"] = round(sampler.total_peak(), 1)
        result["rss_procs"] = len(sampler.peak)
    print("RESULT " + " ".join(f"{key}={value}" for key, value in result.items()))
    return result


def limited_report(
    args: argparse.Namespace, results: dict[str, Series], passes: dict[str, None], result: dict[str, Any]
) -> list[str]:
    """The limited key against the unlimited key of the same rounds: the limiter's cost (issue 12's targets:
    limited / unlimited RPS >= 0.75 non-stream and stream, added p50 at c=1 <= 0.8 ms)."""
    modes = [mode for mode in args.modes if mode in LIMITED_MODES]
    if not modes:
        return []
    result["limiter"] = args.limiter
    limiter = f"redis at {args.redis_url}" if args.limiter == "redis" else args.limiter
    mode_width = max(len("mode"), *(len(mode) for mode in modes))
    header = (
        f"{'pass':<5} {'mode':<{mode_width}} {'unlimited RPS':>14} {'limited RPS':>12} {'limited min..max':>17} "
        f"{'ratio':>6} {'unlimited p50/p99 ms':>21} {'limited p50/p99 ms':>19} {'added p50/p99 ms':>18} {'errors':>6}"
    )
    lines = [
        f"limited key ({args.limits}; limiter: {limiter}) against the unlimited key, same rounds:",
        header,
        "-" * len(header),
    ]
    for stage in passes:
        for mode in modes:
            unlimited = results.get(f"{stage}/{mode}/proxy")
            limited = results.get(f"{stage}/{mode}/limited")
            if unlimited is None or limited is None:
                continue
            prefix = ("" if stage != "c1" else "c1_") + mode.replace("-", "_")
            ratio, added50, added99 = _pair(unlimited, limited)
            errors = unlimited.errors + limited.errors
            result[f"{prefix}_unlimited_rps"] = round(unlimited.median("rps"), 1)
            result[f"{prefix}_vs_unlimited"] = round(ratio, 4)
            result[f"{prefix}_added_p50_vs_unlimited_ms"] = round(added50, 2)
            unlimited_lat = f"{unlimited.median('p50_ms'):.2f} / {unlimited.median('p99_ms'):.2f}"
            limited_lat = f"{limited.median('p50_ms'):.2f} / {limited.median('p99_ms'):.2f}"
            added = f"{added50:+.2f} / {added99:+.2f}"
            lines.append(
                f"{stage:<5} {mode:<{mode_width}} {unlimited.median('rps'):>14.1f} {limited.median('rps'):>12.1f} "
                f"{limited.rps_range:>17} {ratio:>6.3f} {unlimited_lat:>21} {limited_lat:>19} {added:>18} {errors:>6}"
            )
    return lines


# --- the stack ------------------------------------------------------------------------------------------
def stack_env(args: argparse.Namespace, database: Path) -> dict[str, str]:
    """The gateway's environment: production settings on a throwaway database, nothing inherited that matters."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DATABASE_", "REDIS_", "CELERY_"))}
    env.update(
        APP_ENV="production",
        SECRET_KEY=SECRET_KEY,
        ALLOWED_HOSTS="*",
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"sqlite:///{database}",
        CACHE_KEY_PREFIX=args.cache_prefix,
        # INFO: the access log (one line per call, apiforge.access) is on, as in production by default.
        LOG_LEVEL="INFO",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
        if not args.celery_worker:
            # Nobody would consume the Celery queue: the usage thread writes the ledger itself, as embedded.
            env["USAGE_TRANSPORT"] = "database"
    return env


def redis_forget(args: argparse.Namespace) -> None:
    """Delete what the run left in Redis under its own prefix (cache, limiter counters, the Celery queue)."""
    script = (
        "import sys, redis\n"
        "client = redis.Redis.from_url(sys.argv[1])\n"
        "keys = list(client.scan_iter(match=sys.argv[2] + '*', count=1000))\n"
        "for start in range(0, len(keys), 500):\n"
        "    client.delete(*keys[start : start + 500])\n"
        "print(len(keys))\n"
    )
    python = str(args.venv / "bin" / "python")
    done = subprocess.run(
        [python, "-c", script, args.redis_url, args.cache_prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 0:
        log(f"redis: deleted {done.stdout.strip()} keys under {args.cache_prefix}")
    else:
        log(f"redis: could not delete the keys under {args.cache_prefix}: {done.stderr.strip()[-300:]}")


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    bin_dir = args.venv / "bin"
    app = "apiforge.asgi:application"
    host = "127.0.0.1"
    if args.server == "uvicorn":
        # The flags of `make serve` (tests/platform/test_docker_files.py checks they agree); --uvicorn-http swaps
        # the protocol to compare (httptools, h11 ...), --h11-max-incomplete-event-size is passed on for h11.
        command = [
            str(bin_dir / "uvicorn"), app, "--host", host, "--port", str(port), "--workers", str(args.workers),
            "--loop", "uvloop", "--http", args.uvicorn_http, "--lifespan", "on", "--no-access-log",
            "--timeout-keep-alive", "30", "--forwarded-allow-ips", "", "--log-level", "warning",
        ]  # fmt: skip
        if args.h11_max_incomplete_event_size:
            command += ["--h11-max-incomplete-event-size", str(args.h11_max_incomplete_event_size)]
        return command
    if args.server == "granian":
        return [
            str(bin_dir / "granian"), "--interface", "asgi", "--host", host, "--port", str(port),
            "--workers", str(args.workers), "--loop", "uvloop", "--log-level", "warning", app,
        ]  # fmt: skip
    if args.server == "gunicorn":
        return [
            str(bin_dir / "gunicorn"), app, "-k", "uvicorn.workers.UvicornWorker", "-w", str(args.workers),
            "-b", f"{host}:{port}", "--log-level", "warning",
        ]  # fmt: skip
    if args.workers != 1:
        raise SystemExit("daphne serves from one process: use --workers 1")
    return [str(bin_dir / "daphne"), "-b", host, "-p", str(port), "-v", "0", app]


def run_own_stack(args: argparse.Namespace) -> int:
    started: list[Started] = []
    try:
        mock_port, gateway_port = args.upstream_port or free_port(), args.port or free_port()
        upstream_base = f"http://127.0.0.1:{mock_port}/v1"
        python = str(args.venv / "bin" / "python")
        mock_cmd = [python, str(HERE / "mock_upstream.py"), "--port", str(mock_port), "--chunks", str(args.chunks)]
        mock = start("mock_upstream", mock_cmd, cpus=args.load_cpus, env=dict(os.environ), logdir=args.workdir)
        started.append(mock)
        env = stack_env(args, args.workdir / "bench.sqlite3")
        log("migrating a throwaway database and creating an upstream, a model, a route and two keys ...")
        seeded = subprocess.run(
            [python, str(HERE / "stack_seed.py"), "--upstream-url", upstream_base],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if seeded.returncode != 0:
            raise SystemExit(f"stack_seed.py failed:\n{seeded.stdout}\n{seeded.stderr}")
        seed = json.loads(seeded.stdout.strip().splitlines()[-1])
        args.limits = " + ".join(
            f"{name.removesuffix('_limit').removeprefix('max_')} {value:,}" for name, value in seed["limits"].items()
        )
        gateway = start("gateway", server_command(args, gateway_port), cpus=args.cpus, env=env, logdir=args.workdir)
        started.append(gateway)
        if args.celery_worker:
            # The ledger's consumer, on the load CPUs (the gateway keeps its own): as `make worker` runs it.
            worker_cmd = [
                str(args.venv / "bin" / "celery"), "-A", "apiforge", "worker", "--pool", "solo", "-c", "1",
                "--without-gossip", "--without-mingle", "-l", "WARNING",
            ]  # fmt: skip
            started.append(start("celery_worker", worker_cmd, cpus=args.load_cpus, env=env, logdir=args.workdir))
        wait_ready(f"http://127.0.0.1:{mock_port}/health", mock)
        wait_ready(f"http://127.0.0.1:{gateway_port}/health", gateway)
        time.sleep(1.0 if args.workers == 1 else 3.0)  # let every worker finish booting
        targets = [
            Target("direct", chat_url(upstream_base), "", seed["upstream_model"]),
            Target(
                "proxy",
                chat_url(f"http://127.0.0.1:{gateway_port}/v1"),
                seed["api_key"],
                seed["model"],
                gw_url=f"http://127.0.0.1:{gateway_port}{args.gw_path}",
            ),
            Target(
                "limited",
                chat_url(f"http://127.0.0.1:{gateway_port}/v1"),
                seed["limited_api_key"],
                seed["model"],
                gw_url=f"http://127.0.0.1:{gateway_port}{args.gw_path}",
            ),
        ]
        status = bench(args, targets, [gateway.pid], stream_checks=True)
        ledger_report(args.workdir / "bench.sqlite3")
        return status
    finally:
        for proc in reversed(started):
            proc.stop()
            log(f"stopped {proc.name} (pid {proc.pid})")
        if args.redis_url:
            redis_forget(args)


def ledger_report(database: Path, settle_s: float = 30.0) -> None:
    """The ledger after the run: its rows once they stop arriving, and how long each took from the end of its
    call to its commit (the ingestion lag: what a stats query sees at the earliest)."""
    import sqlite3
    from datetime import datetime

    deadline, last = time.monotonic() + settle_s, -1
    with sqlite3.connect(database, timeout=30) as db:
        while time.monotonic() < deadline:
            (count,) = db.execute("SELECT count(*) FROM gateway_stats_usagerecord").fetchone()
            if count == last:
                break
            last = count
            time.sleep(2.0)
        rows = db.execute("SELECT started_at, ingested_at, latency_ms FROM gateway_stats_usagerecord").fetchall()
    if not rows:
        log("ledger: no rows")
        return
    lags = sorted(
        (datetime.fromisoformat(ingested) - datetime.fromisoformat(started)).total_seconds() - latency / 1000
        for started, ingested, latency in rows
    )
    pick = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]  # noqa: E731
    log(
        f"ledger: {len(rows)} rows; ingestion lag (call end -> committed) "
        f"p50={pick(0.5):.2f} s p99={pick(0.99):.2f} s max={lags[-1]:.2f} s"
    )


def bench(args: argparse.Namespace, targets: list[Target], rss_pids: list[int], *, stream_checks: bool) -> int:
    used = [target for target in targets if any(target in targets_for(mode, targets) for mode in args.modes)]
    width = max(len(target.name) for target in used)
    for target in used:
        cold, warm = preflight(target), preflight(target)
        log(f"pre-flight {target.name:<{width}} {target.url}: ok (first {cold:.1f} ms, then {warm:.1f} ms)")
        gw_modes = [mode for mode in args.modes if base_mode(mode) == "gw" and target in targets_for(mode, targets)]
        if gw_modes and target.gw_url:
            cold, warm = preflight(target, target.gw_url), preflight(target, target.gw_url)
            log(f"pre-flight {target.name:<{width}} {target.gw_url}: ok (first {cold:.1f} ms, then {warm:.1f} ms)")
        if target.name == "limited":
            log(f"limiter check {target.name}: {limiter_check(target)}")
    if stream_checks:
        for target in used:
            if any(base_mode(mode) == "stream" and target in targets_for(mode, targets) for mode in args.modes):
                log(f"stream check {target.name:<{width}} {stream_check(target)}")
    sampler = RssSampler(rss_pids) if rss_pids else None
    if sampler is not None:
        sampler.start()
    where = f"against {args.against}" if args.against else f"{args.server} x{args.workers} on cpus {args.cpus or 'all'}"
    if any(mode in LIMITED_MODES for mode in args.modes):
        where += f" limiter={args.limiter}" + (f" ({args.redis_url})" if args.limiter == "redis" else "")
    log(
        f"== {args.label}: {where} load_cpus={args.load_cpus} "
        f"c={args.concurrency} d={args.duration}s rounds={args.rounds} warmup={args.warmup}s c1={args.c1_duration}s "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %Z')})"
    )
    try:
        results = measure(args, targets, sampler)
    finally:
        if sampler is not None:
            sampler.stop()
    result = report(args, results, sampler)
    if args.json_out:
        raw = {key: series.runs for key, series in results.items()}
        Path(args.json_out).write_text(json.dumps({"result": result, "raw": raw}, indent=1))
    errors = sum(series.errors for series in results.values())
    return 1 if errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stack = parser.add_argument_group("the throwaway stack (default)")
    stack.add_argument("--server", choices=SERVERS, default="uvicorn")
    stack.add_argument("--workers", type=int, default=1)
    stack.add_argument(
        "--uvicorn-http", default=UVICORN_HTTP, help=f"uvicorn's --http (default {UVICORN_HTTP}, as make serve)"
    )
    stack.add_argument("--h11-max-incomplete-event-size", type=int, default=0, help="uvicorn h11 only")
    stack.add_argument("--cpus", default=None, help="CPUs for the gateway (default: 0 for one worker, else all)")
    stack.add_argument("--chunks", type=int, default=8, help="content chunks per streamed answer")
    stack.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    stack.add_argument("--upstream-port", type=int, default=0, help="mock upstream port (default: a free one)")
    stack.add_argument(
        "--redis-url",
        "--redis",
        default="",
        metavar="URL",
        help="give the gateway REDIS_URL (cache, limiter: one round trip per limited call; a key prefix of its own, "
        "deleted at the end; the ledger as embedded unless --celery-worker). Default: the embedded setup",
    )
    stack.add_argument(
        "--celery-worker", action="store_true", help="with --redis-url: run a Celery worker (the ledger's consumer)"
    )
    stack.add_argument("--venv", type=Path, default=Path(sys.prefix), help="virtualenv with the servers")
    stack.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    running = parser.add_argument_group("an already running stack")
    running.add_argument("--against", default="", help="gateway base URL, e.g. http://127.0.0.1:8000/v1")
    running.add_argument("--api-key", default="")
    running.add_argument("--limited-api-key", default="", help="a key with limits, for the limited modes")
    running.add_argument("--model", default="")
    running.add_argument("--upstream", default="", help="upstream base URL for the direct side (optional)")
    running.add_argument("--upstream-model", default="", help="model name for direct calls (default --model)")
    running.add_argument("--rss-pid", type=int, action="append", default=[], help="gateway PID (repeatable)")
    load = parser.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=int, default=32)
    load.add_argument("-d", "--duration", type=int, default=5, help="seconds per measured wrk run")
    load.add_argument("--rounds", type=int, default=2, help="A/B rounds per pass and mode")
    load.add_argument("--warmup", type=int, default=2, help="discarded seconds per target, pass and mode")
    load.add_argument("--c1-duration", type=int, default=3, help="seconds per run of the c=1 pass (0: skip it)")
    load.add_argument(
        "--modes",
        default="nonstream,stream,gw",
        help="nonstream, stream (/v1/ chat), gw (the same call via /gw/); limited, limited-stream, limited-gw "
        "(the same calls with the limited key, each round also with the unlimited key)",
    )
    load.add_argument(
        "--gw-path", default="/gw/bench/chat/completions", help="the gw mode's path on the gateway (route 'bench')"
    )
    load.add_argument("--load-cpus", default="1", help="CPUs for wrk and the mock upstream ('' = no pinning)")
    load.add_argument("--label", default="apiforge")
    load.add_argument("--json-out", default="", help="write the result and every raw run here")
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in args.modes if mode not in BASE_MODES and mode not in LIMITED_MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {', '.join(unknown) or 'none given'} (known: {', '.join(MODES)})")
    if args.cpus is None:
        args.cpus = "0" if args.workers == 1 else ""
    if args.against and not (args.api_key and args.model):
        parser.error("--against needs --api-key and --model")
    if args.against and not args.limited_api_key and any(mode in LIMITED_MODES for mode in args.modes):
        parser.error("the limited modes --against a running gateway need --limited-api-key")
    # The gateway's own CACHE_KEY_PREFIX (and Celery queue): nothing shared with another stack on the same Redis.
    args.cache_prefix = f"apiforge-bench-{os.getpid()}-{secrets.token_hex(3)}"
    args.limiter = "external" if args.against else "redis" if args.redis_url else "in-process"  # RESULT: no spaces
    args.limits = "its own limits"  # the seeded stack says which
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops what we started
    args.workdir = Path(tempfile.mkdtemp(prefix="apiforge-bench-"))
    try:
        if args.against:
            targets = []
            if args.upstream:
                targets.append(Target("direct", chat_url(args.upstream), "", args.upstream_model or args.model))
            origin = urllib.parse.urlsplit(args.against)
            gw_url = f"{origin.scheme}://{origin.netloc}{args.gw_path}"
            targets.append(Target("proxy", chat_url(args.against), args.api_key, args.model, gw_url=gw_url))
            if args.limited_api_key:
                limited = Target("limited", chat_url(args.against), args.limited_api_key, args.model, gw_url=gw_url)
                targets.append(limited)
            return bench(args, targets, args.rss_pid, stream_checks=False)
        return run_own_stack(args)
    finally:
        if args.keep:
            log(f"work directory kept: {args.workdir}")
        else:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
