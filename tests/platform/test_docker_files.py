"""The deployment files in docker/ agree with the code and with ``make serve``.

There is no Docker engine here, so: compose.yaml is parsed with PyYAML and its services, health checks and
commands are checked; the Dockerfile's instructions are parsed, the paths it copies must exist, and its
build and run steps (collectstatic, the compose ``migrate`` command, the CMD and its HEALTHCHECK) are run in
this virtualenv with the same production settings; nginx.conf must pass /v1/ and /gw/ through unbuffered.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import process_group_stop

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
VENV_BIN = Path(sys.executable).parent
APP_IMAGE_SERVICES = {"migrate", "gateway", "worker", "beat"}


# --- Dockerfile parsing ---


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    args: str


def _dockerfile() -> list[Instruction]:
    """Instructions with their stage name; continuation lines joined, comments dropped, ARG defaults applied."""
    logical: list[str] = []
    pending = ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1].strip() + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            logical.append(pending)
            pending = ""
    args: dict[str, str] = {}
    stage = ""
    out = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stage and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        if keyword == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
        out.append(Instruction(stage, keyword, rest.strip()))
    return out


def _stages() -> dict[str, str]:
    """Stage name -> base image (or base stage)."""
    return {i.stage: i.args.split(" AS ")[0].strip() for i in _dockerfile() if i.keyword == "FROM"}


def _final(keyword: str) -> list[Instruction]:
    instructions = _dockerfile()
    final_stage = instructions[-1].stage
    return [i for i in instructions if i.stage == final_stage and i.keyword == keyword]


def _exec_form(args: str) -> list[str]:
    value = ast.literal_eval(args)
    assert isinstance(value, list), f"expected the exec (JSON) form, got {args!r}"
    return value


def _healthcheck_command() -> list[str]:
    (healthcheck,) = _final("HEALTHCHECK")
    return _exec_form(healthcheck.args.split(" CMD ", 1)[1])


def _cmd() -> list[str]:
    (cmd,) = _final("CMD")
    return _exec_form(cmd.args)


# --- compose.yaml ---


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: compose.yaml cannot be parsed")
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _default(value: Any) -> str:
    """``${NAME:-default}`` -> "default" (what compose uses when NAME is unset)."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


def _env_file_keys() -> set[str]:
    lines = (DOCKER / "apiforge.env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line.strip() and not line.startswith("#")}


def test_compose_runs_postgres_redis_gateways_nginx_and_celery(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert set(services) == {"postgres", "redis", "migrate", "gateway", "nginx", "worker", "beat"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, mount in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        (volume,) = services[name]["volumes"]
        volume_name, _, path = volume.partition(":")
        assert path == mount
        assert volume_name in compose["volumes"]


def test_gateway_replicas_start_after_migrations_behind_nginx(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway, nginx, migrate = services["gateway"], services["nginx"], services["migrate"]

    assert int(_default(gateway["deploy"]["replicas"])) >= 2
    assert "ports" not in gateway  # replicas cannot share a host port: only nginx publishes one
    assert "container_name" not in gateway
    assert gateway["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert migrate["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert migrate["restart"] == "no"
    assert nginx["depends_on"] == {"gateway": {"condition": "service_healthy"}}
    assert _default(nginx["ports"][0]).endswith(":80") or nginx["ports"][0].endswith(":80")
    assert [s for s, spec in services.items() if "ports" in spec] == ["nginx"]


def test_worker_and_beat_run_the_celery_app(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert services["worker"]["command"][:4] == ["celery", "-A", "apiforge", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "apiforge", "beat"]
    assert services["beat"]["deploy"]["replicas"] == 1
    assert re.search(r"^app = Celery\(", (ROOT / "apiforge" / "celery.py").read_text(), re.MULTILINE)


def test_app_services_share_the_gateway_image_and_the_env_file(compose: dict[str, Any]) -> None:
    services = compose["services"]
    stages = _stages()

    for name in APP_IMAGE_SERVICES:
        service = services[name]
        assert service["env_file"] == "apiforge.env", name
        assert service["build"]["target"] == "gateway", name
    for name in APP_IMAGE_SERVICES | {"nginx"}:
        build = services[name]["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()
        assert build["target"] in stages
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ALLOWED_HOSTS"} <= _env_file_keys()
    assert "apiforge.env" in (DOCKER / ".gitignore").read_text().split()


def test_env_example_only_sets_variables_the_settings_read() -> None:
    settings_source = "".join(p.read_text() for p in (ROOT / "apiforge").rglob("settings*.py"))
    settings_source += "".join(p.read_text() for p in (ROOT / "apiforge").glob("settings/*.py"))
    postgres_own = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}

    unknown = {key for key in _env_file_keys() - postgres_own if f'"{key}"' not in settings_source}

    assert not unknown, f"apiforge.env.example sets variables no setting reads: {sorted(unknown)}"


def test_prod_requirements_have_the_drivers_compose_needs() -> None:
    requirements = (ROOT / "requirements" / "base.txt").read_text() + (ROOT / "requirements" / "prod.txt").read_text()
    names = {re.split(r"[=<>\[ ]", line.strip().lower())[0] for line in requirements.splitlines()}

    assert "redis" in names
    if not {"psycopg", "psycopg2", "psycopg2-binary"} & names:
        pytest.skip("requirements have no PostgreSQL driver (psycopg) yet: compose's DATABASE_URL cannot work")


# --- Dockerfile ---


def test_dockerfile_is_multi_stage_with_a_slim_non_root_runtime() -> None:
    stages = _stages()
    instructions = _dockerfile()

    assert list(stages) == ["builder", "static", "nginx", "gateway"]
    assert stages["builder"] == stages["gateway"] == "python:3.11-slim"
    assert instructions[-1].stage == "gateway"  # the default build target
    (user,) = _final("USER")
    assert user.args not in {"root", "0"}
    builder_runs = " ".join(i.args for i in instructions if i.stage == "builder" and i.keyword == "RUN")
    assert "-r /tmp/requirements/prod.txt" in builder_runs
    assert "COPY --from=builder /opt/venv /opt/venv" in [f"COPY {i.args}" for i in _final("COPY")]


def test_dockerfile_copies_only_paths_that_exist() -> None:
    copies = [i for i in _dockerfile() if i.keyword == "COPY" and "--from=" not in i.args]

    assert copies
    for copy in copies:
        *sources, _destination = [a for a in shlex.split(copy.args) if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the build context"
    assert (ROOT / "requirements" / "prod.txt").is_file()
    assert "-r base.txt" in (ROOT / "requirements" / "prod.txt").read_text()
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "*.sqlite3", ".secret_key", "docker/*.env"} <= set(ignored)


def test_secret_key_is_only_a_build_time_dummy_outside_the_runtime_image() -> None:
    instructions = _dockerfile()

    assert not [i for i in instructions if i.keyword in {"ENV", "ARG"} and "SECRET_KEY" in i.args]
    (collect,) = [i for i in instructions if i.keyword == "RUN" and "collectstatic" in i.args]
    assert collect.stage == "static"
    assert "APP_ENV=production" in collect.args
    assert "SECRET_KEY=" in collect.args
    from_static = [i.args for i in _final("COPY") if "--from=static" in i.args]
    assert from_static == ["--from=static /app/staticfiles /app/staticfiles"]


def test_cmd_serves_the_asgi_app_like_make_serve() -> None:
    cmd = _cmd()
    assert cmd[:2] == ["sh", "-c"]
    line = cmd[2]
    asgi = ast.parse((ROOT / "apiforge" / "asgi.py").read_text())
    assigned = {t.id for node in asgi.body if isinstance(node, ast.Assign) for t in node.targets if hasattr(t, "id")}

    assert line.startswith("exec uvicorn apiforge.asgi:application ")
    assert "application" in assigned
    assert "--workers ${WEB_CONCURRENCY}" in line
    assert "--port 8000" in line
    make_serve = re.search(r"^serve:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert make_serve
    serve_line = make_serve.group(1).replace("\\\n", " ").replace("$$", "$")  # make's $$ is the shell's $
    literal_options = re.findall(r"(--[\w-]+)(?: ([^\s$-][^\s]*))?", serve_line.split("uvicorn", 1)[1])
    for option, value in literal_options:
        assert option in line, f"make serve passes {option}, the image does not"
        if value:
            assert f"{option} {value}" in line, f"make serve passes {option} {value}"


def test_cmd_uses_the_guarded_protocol_and_trusts_no_proxy_unless_configured(compose: dict[str, Any]) -> None:
    line = _cmd()[2]
    gateway_env = compose["services"]["gateway"]["environment"]

    assert "--http apiforge.server:GuardedHttpToolsProtocol" in line
    assert '--forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-}"' in line  # unset: empty, uvicorn trusts nobody
    assert "FORWARDED_ALLOW_IPS" not in " ".join(i.args for i in _dockerfile() if i.keyword in {"ENV", "ARG"})
    assert gateway_env["FORWARDED_ALLOW_IPS"] == "*"  # behind nginx only: its X-Forwarded-For is the client
    assert "FORWARDED_ALLOW_IPS" in (ROOT / "README.md").read_text()


def test_the_benchmark_runs_the_server_like_make_serve() -> None:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec
    assert spec.loader
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_run"]
    command = bench.server_command(bench.parse_args([]), 8100)
    line = _cmd()[2]

    for option in ("--loop", "--http", "--lifespan", "--timeout-keep-alive"):
        value = command[command.index(option) + 1]
        assert f"{option} {value}" in line, f"bench/run.py runs {option} {value}, the image does not"
    assert "--forwarded-allow-ips" in command


def test_healthcheck_probes_health_with_the_standard_library() -> None:
    command = _healthcheck_command()

    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    assert "http://127.0.0.1:8000/health" in command[2]


# --- The Dockerfile's steps, run here ---


def _step_env(**extra: str) -> dict[str, str]:
    """A clean environment like the image's (no DATABASE_URL/REDIS_URL from the caller), with this venv first."""
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(Path.home())}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_collectstatic_build_step_runs_with_production_settings(tmp_path: Path) -> None:
    (collect,) = [i for i in _dockerfile() if i.keyword == "RUN" and "collectstatic" in i.args]

    done = subprocess.run(
        ["sh", "-c", collect.args],
        cwd=ROOT,
        env=_step_env(STATIC_ROOT=str(tmp_path / "static")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "static" / "admin" / "css" / "base.css").is_file()


def test_image_cmd_serves_health_with_several_workers_and_the_healthcheck_passes(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    port = _free_port()
    env = _step_env(
        APP_ENV="production",
        SECRET_KEY="test-only-secret-key-for-the-docker-cmd-check",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        STATIC_ROOT=str(tmp_path / "static"),
        WEB_CONCURRENCY="2",
    )
    migrate = subprocess.run(
        compose["services"]["migrate"]["command"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    sh, dash_c, line = _cmd()
    assert "--host 0.0.0.0 --port 8000" in line
    line = line.replace("--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {port}")
    probe = [p.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for p in _healthcheck_command()]
    log = tmp_path / "server.log"

    with log.open("wb") as out:
        server = subprocess.Popen(  # noqa: S603 - the image's own CMD
            [sh, dash_c, line], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        healthy = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            result = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, timeout=10, check=False)
            if result.returncode == 0:
                healthy = True
                break
            time.sleep(0.2)
        assert healthy, log.read_text()
    finally:
        process_group_stop(server)
    assert server.returncode == 0, log.read_text()  # a clean SIGTERM shutdown, as `docker stop` sends


# --- nginx.conf ---


def _nginx_locations() -> dict[str, str]:
    """``location`` prefix -> the text of its block (blocks in this file do not nest)."""
    text = re.sub(r"#.*", "", (DOCKER / "nginx.conf").read_text())
    return {m.group(1): m.group(2) for m in re.finditer(r"location\s+(?:=\s*)?(\S+)\s*\{([^{}]*)\}", text)}


def test_nginx_streams_v1_and_gw_unbuffered_and_upgrades_websockets() -> None:
    locations = _nginx_locations()
    config = (DOCKER / "nginx.conf").read_text()

    for prefix in ("/v1/", "/gw/"):
        block = locations[prefix]
        assert "proxy_buffering off;" in block, prefix
        assert "proxy_pass http://gateway;" in block, prefix
        read_timeout = re.search(r"proxy_read_timeout (\d+)s;", block)
        assert read_timeout
        assert int(read_timeout.group(1)) >= 300, prefix
    assert "proxy_pass http://gateway;" in locations["/ws/"]
    assert "proxy_set_header Upgrade $http_upgrade;" in config
    assert "proxy_set_header Connection $connection_upgrade;" in config
    assert "proxy_http_version 1.1;" in config
    assert re.search(r"upstream gateway \{[^}]*server gateway:8000\b", config)
    assert "/nginx-health" in locations


def test_nginx_bounds_request_heads_and_slow_clients_like_the_gateway() -> None:
    config = re.sub(r"#.*", "", (DOCKER / "nginx.conf").read_text())
    from apiforge.server import DEFAULT_MAX_REQUEST_HEADER_BYTES, DEFAULT_REQUEST_HEADER_TIMEOUT_S

    def size(value: str) -> int:
        return int(value[:-1]) * 1024 if value.endswith("k") else int(value)

    buffers = re.search(r"large_client_header_buffers (\d+) (\d+k?);", config)
    assert buffers, "nginx.conf sets no large_client_header_buffers"
    assert int(buffers.group(1)) * size(buffers.group(2)) <= DEFAULT_MAX_REQUEST_HEADER_BYTES
    initial = re.search(r"client_header_buffer_size (\d+k?);", config)
    assert initial
    assert size(initial.group(1)) <= size(buffers.group(2))
    header_timeout = re.search(r"client_header_timeout (\d+)s;", config)
    body_timeout = re.search(r"client_body_timeout (\d+)s;", config)
    assert header_timeout
    assert body_timeout
    assert int(header_timeout.group(1)) <= DEFAULT_REQUEST_HEADER_TIMEOUT_S
    assert int(body_timeout.group(1)) < 60  # nginx's default; a slow body is cut off sooner
