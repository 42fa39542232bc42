"""Settings, read from the environment through one django-environ reader.

Every variable is documented in the README's configuration table. With nothing
set, APIForge runs on the embedded default: a SQLite file, local-memory cache,
in-memory channel layer and Celery tasks executed in-process. ``APP_ENV`` picks
the safety defaults: ``production`` (the default) keeps DEBUG off and refuses to
start without ``SECRET_KEY``; ``development`` turns DEBUG on; ``test`` is what the
test suite uses.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

# Under pytest (and mypy, whose django-stubs plugin loads these settings) the default is
# "test", so a bare `pytest` or `mypy .` needs no environment.
_TOOLING = "pytest" in sys.modules or "mypy" in sys.modules
APP_ENV = env.str("APP_ENV", default="test" if _TOOLING else "production")
if APP_ENV not in {"production", "development", "test"}:
    raise environ.ImproperlyConfigured("APP_ENV must be production, development or test")
IS_PRODUCTION = APP_ENV == "production"

DEBUG = env.bool("DEBUG", default=APP_ENV == "development") if not IS_PRODUCTION else False


def _secret_key() -> str:
    """SECRET_KEY from the environment; in development a generated one kept in a local file."""
    value = env.str("SECRET_KEY", default="")
    if value:
        return value
    if IS_PRODUCTION:
        raise environ.ImproperlyConfigured("SECRET_KEY must be set when APP_ENV=production")
    path = BASE_DIR / ".secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(64))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[] if IS_PRODUCTION else ["*"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    # Unfold (the admin's theme) must come before the admin, whose templates it overrides.
    "unfold.apps.BasicAppConfig",  # not "unfold": its default config replaces admin.site with a plain Unfold site
    "unfold.contrib.filters",
    "apiforge.apps.AdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "accounts",
    "keys",
    "proxy",
    "gateway_stats",
]

MIDDLEWARE = [
    "apiforge.request_id.RequestIdMiddleware",
    # Database/cache outages raised by non-DRF views (the admin) answer 503, not 500; DRF views: apiforge.errors.
    "apiforge.unavailable.ServiceUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

if IS_PRODUCTION:
    # Serves the admin's and the API docs' static files from STATIC_ROOT (no separate web server needed);
    # in development apiforge/urls.py serves them from the apps.
    MIDDLEWARE.insert(2, "whitenoise.middleware.WhiteNoiseMiddleware")

ROOT_URLCONF = "apiforge.urls"
AUTH_USER_MODEL = "accounts.User"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "apiforge" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "apiforge.asgi.application"

# --- Database ---------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded default has writers in several threads (requests, the usage hand-off): take the write
    # lock at BEGIN and wait for it, instead of failing with "database is locked" when two meet.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"}
    )
    if APP_ENV == "test":
        # A file, not Django's shared-cache in-memory database: there, two threads writing at once fail at once
        # ("database table is locked", the busy timeout does not apply), which a real SQLite file never does.
        DATABASES["default"].setdefault(
            "TEST", {"NAME": os.path.join(tempfile.gettempdir(), f"apiforge-test-{os.getpid()}.sqlite3")}
        )
DATABASES["default"]["ATOMIC_REQUESTS"] = False  # Django refuses async views with it on.
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env.bool("DB_POOL", default=True):
    # A bounded pool per process (psycopg_pool): concurrent requests share DB_POOL_MAX_SIZE connections instead
    # of opening one each until PostgreSQL runs out ("too many clients"); a request that waits longer than
    # DB_POOL_TIMEOUT_S for one answers 503 with Retry-After (apiforge/unavailable.py). Pooling replaces
    # persistent connections, so CONN_MAX_AGE must be 0 with it.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DB_POOL_MIN_SIZE", default=1),
        "max_size": env.int("DB_POOL_MAX_SIZE", default=10),
        "timeout": env.float("DB_POOL_TIMEOUT_S", default=5.0),
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=0))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, channel layer, Celery broker --------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
# Tests get their own prefix (and Celery queue) so they never touch a running stack's data.
CACHE_KEY_PREFIX = env.str(
    "CACHE_KEY_PREFIX", default=f"apiforge-test-{os.getpid()}" if APP_ENV == "test" else "apiforge"
)

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": CACHE_KEY_PREFIX,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": 1,
                "SOCKET_TIMEOUT": 1,
            },
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py's default socket timeout (5 s) equals channels-redis' blocking receive (BZPOPMIN, 5 s):
            # an idle consumer (the live traffic page) would die of a TimeoutError. The socket waits longer.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}], "prefix": f"{CACHE_KEY_PREFIX}:asgi"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "KEY_PREFIX": CACHE_KEY_PREFIX}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Celery ------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL or "cache+memory://")
_BROKER_CONFIGURED = bool(REDIS_URL or os.environ.get("CELERY_BROKER_URL"))
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not _BROKER_CONFIGURED)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json", "orjson"]  # orjson: apiforge/celery.py
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_QUEUE", default=CACHE_KEY_PREFIX)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_TIME_LIMIT = 60
CELERY_TASK_SOFT_TIME_LIMIT = 50

# A message the worker has not acknowledged (it died mid-batch) is delivered again after this (Redis broker;
# Celery's default is an hour). Only the usage consumer acknowledges late, so no long task is cut short by it.
CELERY_VISIBILITY_TIMEOUT_S = env.int("CELERY_VISIBILITY_TIMEOUT_S", default=60)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_VISIBILITY_TIMEOUT_S,
    # A broker that does not answer fails a publish fast: the usage thread spools instead of waiting.
    "socket_connect_timeout": 1,
    "socket_timeout": 2,
    # Look for such messages every 5 s (kombu's default sweep is every 10th call of a 10 s timer: 100 s).
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
}
CELERY_BROKER_CONNECTION_TIMEOUT = 2

# --- Usage ledger (gateway_stats: usage.py, transport.py, spool.py) ---------------------------------
# auto: Celery when a broker is configured, else written by the usage thread itself (embedded default).
USAGE_TRANSPORT = env.str("USAGE_TRANSPORT", default="auto")
if USAGE_TRANSPORT not in {"auto", "celery", "database"}:
    raise environ.ImproperlyConfigured("USAGE_TRANSPORT must be auto, celery or database")
USAGE_FLUSH_INTERVAL_S = env.float("USAGE_FLUSH_INTERVAL_S", default=1.0)
USAGE_MAX_QUEUE = env.int("USAGE_MAX_QUEUE", default=200_000)
USAGE_MESSAGE_ROWS = env.int("USAGE_MESSAGE_ROWS", default=500)
USAGE_TRANSPORT_RETRY_S = env.float("USAGE_TRANSPORT_RETRY_S", default=2.0)
# One spool file per process; default: <tmp>/apiforge-spool (tests: their own directory per run).
USAGE_SPOOL_DIR = env.str(
    "USAGE_SPOOL_DIR",
    default=os.path.join(tempfile.gettempdir(), f"apiforge-test-spool-{os.getpid()}") if APP_ENV == "test" else "",
)

# --- Usage statistics (gateway_stats: rollups.py, stats.py, apis.py) --------------------------------
# Rollups per minute/hour/day by `celery beat` every USAGE_ROLLUP_INTERVAL_S; statistics merge them with the
# raw rows ingested since (gateway_stats/stats.py), so they are current without waiting for a run.
USAGE_ROLLUP_INTERVAL_S = env.float("USAGE_ROLLUP_INTERVAL_S", default=30.0)
# Each run re-reads the rows ingested this long before the last watermark (transactions committing late).
USAGE_ROLLUP_OVERLAP_S = env.float("USAGE_ROLLUP_OVERLAP_S", default=300.0)
USAGE_RAW_RETENTION_DAYS = env.int("USAGE_RAW_RETENTION_DAYS", default=30)
USAGE_ROLLUP_RETENTION_DAYS = env.int("USAGE_ROLLUP_RETENTION_DAYS", default=400)
if USAGE_ROLLUP_INTERVAL_S <= 0 or USAGE_ROLLUP_OVERLAP_S < 0 or USAGE_RAW_RETENTION_DAYS < 2:
    raise environ.ImproperlyConfigured(
        "USAGE_ROLLUP_INTERVAL_S must be > 0, USAGE_ROLLUP_OVERLAP_S >= 0, USAGE_RAW_RETENTION_DAYS >= 2"
    )
CELERY_BEAT_SCHEDULE = {
    "usage-rollup": {
        "task": "gateway_stats.rollup",
        "schedule": USAGE_ROLLUP_INTERVAL_S,
        "options": {"expires": USAGE_ROLLUP_INTERVAL_S},  # a run queued behind a busy worker is skipped
    },
    "usage-retention": {"task": "gateway_stats.retention", "schedule": 3600.0, "options": {"expires": 1800}},
}

# --- Auth ----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# authenticate() itself is throttled (accounts/backends.py), so the API and the admin share one lockout.
AUTHENTICATION_BACKENDS = ["accounts.backends.ThrottledModelBackend"]

LOGIN_THROTTLE_FAILURES = env.int("LOGIN_THROTTLE_FAILURES", default=5)
LOGIN_THROTTLE_IP_FAILURES = env.int("LOGIN_THROTTLE_IP_FAILURES", default=50)
LOGIN_THROTTLE_WINDOW_S = env.int("LOGIN_THROTTLE_WINDOW_S", default=300)
REGISTRATION_THROTTLE_RATE = env.int("REGISTRATION_THROTTLE_RATE", default=10)
REGISTRATION_THROTTLE_WINDOW_S = env.int("REGISTRATION_THROTTLE_WINDOW_S", default=3600)
REGISTRATION_ENUMERATION_SAFE = env.bool("REGISTRATION_ENUMERATION_SAFE", default=False)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "keys.credentials.ManagementJwtAuthentication",  # simplejwt's, naming the credential expected
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": ["apiforge.parsers.JSONParser"],  # depth limit, no NUL or lone surrogates
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "DEFAULT_FILTER_BACKENDS": [
        "apiforge.filters.StrictDjangoFilterBackend",  # ?is_active=maybe is a 400, not ignored
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "apiforge.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(minutes=env.int("JWT_ACCESS_MINUTES", default=30)),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=env.int("JWT_REFRESH_DAYS", default=7)),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": True,
    "AUTH_HEADER_TYPES": ("Bearer",),
}

SPECTACULAR_SETTINGS = {
    "TITLE": "APIForge API",
    "DESCRIPTION": (
        "APIForge, an API gateway with an OpenAI-compatible proxy. The management API (`/auth/`, `/api/`) takes a "
        "JWT access token from `/auth/login` (or an admin session): accounts, your API keys and, for staff, "
        "upstreams, models, routes, the request log, statistics and the audit trail. The proxy the clients call "
        "takes an API key (`Authorization: Bearer afk-...` or `x-api-key`): the OpenAI-compatible endpoints "
        "under `/v1/` and the gateway routes under `/gw/`, documented here under their own tags. Errors of the "
        "management API are `{detail, code, fields}`; the proxy's are OpenAI-shaped `{error: {message, type, "
        "param, code}}`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "apiforge.schema.error_responses_and_strict_bodies",  # the error answers every operation can give
        "apiforge.schema_proxy.proxy_paths",  # /v1/ and /gw/, answered by the edge rather than by DRF views
    ],
}

# The only session login is the admin's: Unfold's login form carries no "next" field, so a login started at
# /admin/login/ itself would land on Django's default /accounts/profile/ (a 404).
LOGIN_REDIRECT_URL = "/admin/"

# --- Admin (Unfold theme: apiforge/admin_site.py; every asset from our static files) ----------------
UNFOLD = {
    "SITE_TITLE": "APIForge",
    "SITE_HEADER": "APIForge",
    "SITE_SUBHEADER": "API gateway control room",
    "SITE_URL": "/",
    "SITE_SYMBOL": "hub",
    "SHOW_HISTORY": True,
    "SHOW_VIEW_ON_SITE": True,
    "DASHBOARD_CALLBACK": "apiforge.dashboard.dashboard_callback",
    "SCRIPTS": ["apiforge.admin_site.chart_script"],  # rounds the charts' y-axis ticks (float noise)
    "SIDEBAR": {
        "show_search": True,
        "show_all_applications": False,
        "navigation": "apiforge.admin_site.sidebar_navigation",
    },
}

# --- Security ------------------------------------------------------------------
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=IS_PRODUCTION)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=IS_PRODUCTION)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=IS_PRODUCTION)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000 if IS_PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("BEHIND_TLS_PROXY", default=False) else None
SECURE_REDIRECT_EXEMPT = [r"^health"]
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
CSRF_FAILURE_VIEW = "apiforge.errors.csrf_failure"  # JSON, like every other error

# Pepper for API-key digests (HMAC-SHA256); defaults to one derived from SECRET_KEY.
API_KEY_PEPPER = env.str("API_KEY_PEPPER", default="")
# Key for encrypting upstream credentials at rest (Fernet); defaults to one derived from SECRET_KEY.
FIELD_ENCRYPTION_KEY = env.str("FIELD_ENCRYPTION_KEY", default="")

# --- Proxy -----------------------------------------------------------------
PROXY_MAX_BODY_BYTES = env.int("PROXY_MAX_BODY_BYTES", default=10 * 1024 * 1024)
PROXY_POOL_SIZE = env.int("PROXY_POOL_SIZE", default=1000)
PROXY_POOL_PER_HOST = env.int("PROXY_POOL_PER_HOST", default=0)
PROXY_KEEPALIVE_S = env.float("PROXY_KEEPALIVE_S", default=30.0)
PROXY_CONNECT_TIMEOUT_S = env.float("PROXY_CONNECT_TIMEOUT_S", default=5.0)
# Lean ASGI dispatch for /v1/ and /gw/ (off = every request goes through Django).
PROXY_LEAN_ASGI = env.bool("PROXY_LEAN_ASGI", default=True)
# How often a worker looks for invalidations made elsewhere (seconds).
CACHE_SYNC_INTERVAL_S = env.float("CACHE_SYNC_INTERVAL_S", default=0.5)

# --- Gateway routes, balancing, breakers, health (proxy/edge/gateway*.py, balance.py, breaker.py, health.py) --
# Targets a route registered *by an API key* may point at (hosts, host:port or CIDRs); empty: keys may not
# register routes at all (staff always may). Keeps a key from aiming the gateway at internal addresses.
ROUTE_TARGET_ALLOWLIST = env.list("ROUTE_TARGET_ALLOWLIST", default=[])
# How often `celery beat` deactivates routes whose lease ran out (they stop serving at expiry regardless).
ROUTE_LEASE_SWEEP_S = env.float("ROUTE_LEASE_SWEEP_S", default=15.0)
# A /gw/ request body up to this size (with a Content-Length) is buffered, so a failed attempt can be
# retried on another target; a larger or chunked one is streamed through and never retried.
GATEWAY_RETRY_BUFFER_BYTES = env.int("GATEWAY_RETRY_BUFFER_BYTES", default=64 * 1024)
# Breaker state is shared through Redis (in-process without it); each worker refreshes its copy this often.
BREAKER_SYNC_INTERVAL_S = env.float("BREAKER_SYNC_INTERVAL_S", default=0.5)
# An open breaker's cooldown doubles on each trip in a row, up to this.
BREAKER_COOLDOWN_MAX_S = env.float("BREAKER_COOLDOWN_MAX_S", default=300.0)
# Besides consecutive failures: open when the error rate over the window exceeds this (0 = off), once the
# window holds at least BREAKER_MIN_REQUESTS calls.
BREAKER_ERROR_RATE = env.float("BREAKER_ERROR_RATE", default=0.5)
BREAKER_WINDOW_S = env.float("BREAKER_WINDOW_S", default=10.0)
BREAKER_MIN_REQUESTS = env.int("BREAKER_MIN_REQUESTS", default=20)
# Active health checks of route targets with a health_check (one prober per target and interval across all
# workers, through a shared lock); off: only passive checks (the breakers).
HEALTH_CHECKS = env.bool("HEALTH_CHECKS", default=True)
# --- Rate limits, concurrency, budgets (proxy/edge/limits.py, proxy/edge/admit.py) -----------------------
# Budget periods (day, month) roll at midnight / on the first of the month in this IANA time zone.
BUDGET_TIMEZONE = env.str("BUDGET_TIMEZONE", default="UTC")
try:
    ZoneInfo(BUDGET_TIMEZONE)
except (ZoneInfoNotFoundError, ValueError):
    raise environ.ImproperlyConfigured(
        f"BUDGET_TIMEZONE={BUDGET_TIMEZONE!r} is not an IANA time zone (e.g. Europe/Paris)."
    ) from None
# How often the beat task proxy.limits_reconcile rebuilds the budget counters from the ledger (lost ones after a
# Redis flush or restart, or counts below the ledger's); in-process without a broker.
RATE_LIMIT_RECONCILE_S = env.float("RATE_LIMIT_RECONCILE_S", default=60.0)
# Redis unreachable: serve (true, logged once per interval, counted) or refuse with 429 rate_limiter_unavailable.
RATE_LIMIT_FAIL_OPEN = env.bool("RATE_LIMIT_FAIL_OPEN", default=True)
# The limiter's Redis calls give up after this (the request path never waits for a TCP timeout). Wall time, the
# event loop's own delays included: a tighter value takes a busy moment of the worker (a GC pause, a loaded host)
# for Redis down and fails open for RATE_LIMIT_REDIS_RETRY_S. Kong's default is 2 s, APISIX's 1 s.
RATE_LIMIT_REDIS_TIMEOUT_S = env.float("RATE_LIMIT_REDIS_TIMEOUT_S", default=0.5)
# After a failed Redis call the limiter stops trying for this long (its own breaker), then probes again.
RATE_LIMIT_REDIS_RETRY_S = env.float("RATE_LIMIT_REDIS_RETRY_S", default=1.0)
# A concurrency lease is dropped this long after its last renewal (a dead worker's in-flight calls free up).
RATE_LIMIT_LEASE_TTL_S = env.float("RATE_LIMIT_LEASE_TTL_S", default=60.0)
CELERY_BEAT_SCHEDULE["route-leases"] = {
    "task": "proxy.route_leases_expire",
    "schedule": ROUTE_LEASE_SWEEP_S,
    "options": {"expires": ROUTE_LEASE_SWEEP_S},
}
CELERY_BEAT_SCHEDULE["limits-reconcile"] = {
    "task": "proxy.limits_reconcile",
    "schedule": RATE_LIMIT_RECONCILE_S,
    "options": {"expires": RATE_LIMIT_RECONCILE_S},
}

# --- Server (apiforge/server.py, the uvicorn protocol of `make serve` and the image) ---------------
# Request line and headers of one request, in bytes: past this it is answered 431 before more is read.
MAX_REQUEST_HEADER_BYTES = env.int("MAX_REQUEST_HEADER_BYTES", default=16 * 1024)
# A request's headers must arrive within this of its first byte, its body within this of its headers (else 408).
REQUEST_HEADER_TIMEOUT_S = env.float("REQUEST_HEADER_TIMEOUT_S", default=10.0)
REQUEST_BODY_TIMEOUT_S = env.float("REQUEST_BODY_TIMEOUT_S", default=30.0)

# --- Metrics, access log, event bus -------------------------------------------------
# /metrics (apiforge/metrics.py): a Bearer token and/or client addresses/networks allowed to scrape. With neither,
# /metrics is open in development and test and refused in production. Multiprocess mode: PROMETHEUS_MULTIPROC_DIR,
# read by prometheus_client itself (README "Metrics").
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_ALLOWED_IPS = env.list("METRICS_ALLOWED_IPS", default=[])
for _entry in METRICS_ALLOWED_IPS:
    try:
        ipaddress.ip_network(_entry, strict=False)
    except ValueError:
        raise environ.ImproperlyConfigured(
            f"METRICS_ALLOWED_IPS: {_entry!r} is not an IP address or network (e.g. 10.0.0.0/8)"
        ) from None
# One structured line per proxied call on the logger "apiforge.access" (gateway_stats/access_log.py).
ACCESS_LOG = env.bool("ACCESS_LOG", default=True)
# Event bus (gateway_stats/events.py): usage and audit events on the channel layer and, when set, on a ZeroMQ PUB
# socket bound to (or, with EVENTS_ZMQ_MODE=connect, connected to) this address.
EVENTS_ZMQ_PUB = env.str("EVENTS_ZMQ_PUB", default="")
EVENTS_ZMQ_MODE = env.str("EVENTS_ZMQ_MODE", default="bind")
if EVENTS_ZMQ_MODE not in {"bind", "connect"}:
    raise environ.ImproperlyConfigured("EVENTS_ZMQ_MODE must be bind or connect")
EVENTS_ZMQ_SNDHWM = env.int("EVENTS_ZMQ_SNDHWM", default=10000)
EVENTS_QUEUE_MAX = env.int("EVENTS_QUEUE_MAX", default=10000)

# --- I18N / static ---------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "/static/"
STATIC_ROOT = env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles"))

# --- Logging ----------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
LOG_FORMAT = env.str("LOG_FORMAT", default="json" if IS_PRODUCTION else "console")

_LOG_FORMAT = LOG_FORMAT if LOG_FORMAT in {"json", "console"} else "console"
_CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s [%(request_id)s] %(name)s: %(message)s"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "apiforge.request_id.RequestIdLogFilter"}},
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "console": {"format": _CONSOLE_FORMAT},
        # The access log's (one line per proxied call): the same lines, made without python-json-logger and
        # written a whole usage batch at a time (gateway_stats/access_log.py).
        "access_json": {"()": "gateway_stats.access_log.AccessLogFormatter", "json": True},
        "access_console": {"()": "gateway_stats.access_log.AccessLogFormatter", "fmt": _CONSOLE_FORMAT},
    },
    "handlers": {
        "default": {
            "class": "logging.StreamHandler",
            "formatter": _LOG_FORMAT,
            "filters": ["request_id"],
        },
        "access": {"class": "gateway_stats.access_log.AccessLogHandler", "formatter": f"access_{_LOG_FORMAT}"},
    },
    "root": {"handlers": ["default"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"level": LOG_LEVEL, "propagate": True},
        "django.request": {"level": "ERROR", "propagate": True},
        "django.server": {"level": "WARNING", "propagate": True},
        # Its level is the root's (LOG_LEVEL); ACCESS_LOG=false turns it off.
        "apiforge.access": {"handlers": ["access"], "propagate": False},
    },
}
