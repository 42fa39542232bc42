"""Login brute-force throttling: failed logins counted per username and per client IP.

Counters live in Django's cache (django-redis when ``REDIS_URL`` is set, so every
worker process shares them). A counter's window starts at its first failure and
lasts ``LOGIN_THROTTLE_WINDOW_S``; once it reaches ``LOGIN_THROTTLE_FAILURES``,
logins for that username (or from that IP) are refused until the window ends.
Only failures count; a successful login clears the username's counter (not the
IP's, so an attacker cannot reset it by logging into an account of their own).

Concurrent attempts may slip a few failures past the limit (the check and the
count are separate cache calls): fine for brute-force protection, which is all
this is (see STYLE.md on DRF throttles). If the cache is unreachable, logins are
not throttled and a warning is logged: availability over a second line of defence.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

from django.conf import settings
from django.core.cache import cache

from accounts.exceptions import LoginThrottled

logger = logging.getLogger(__name__)


def _bucket(kind: str, value: str) -> str:
    # Hashed: usernames may hold characters that are not safe in cache keys.
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    return f"login-fail:{kind}:{digest}"


def _buckets(*, username: str, ip: str | None) -> list[str]:
    buckets = [_bucket("user", username.strip().casefold())]
    if ip:
        buckets.append(_bucket("ip", ip))
    return buckets


def login_throttle_check(*, username: str, ip: str | None) -> None:
    """Raise ``LoginThrottled`` when the username or the IP has used up its failures."""
    buckets = _buckets(username=username, ip=ip)
    try:
        values = cache.get_many([f"{b}:{part}" for b in buckets for part in ("n", "since")])
    except Exception:
        logger.warning("login throttle check skipped: cache unavailable", exc_info=True)
        return
    now = time.time()
    window = settings.LOGIN_THROTTLE_WINDOW_S
    retry_after = 0
    for bucket in buckets:
        if int(values.get(f"{bucket}:n", 0)) < settings.LOGIN_THROTTLE_FAILURES:
            continue
        since = float(values.get(f"{bucket}:since", now))
        retry_after = max(retry_after, math.ceil(since + window - now), 1)
    if retry_after:
        raise LoginThrottled(
            f"Too many failed login attempts. Try again in {retry_after} seconds.", retry_after=retry_after
        )


def login_failure_record(*, username: str, ip: str | None) -> None:
    """Count one failed login against the username and the IP."""
    window = settings.LOGIN_THROTTLE_WINDOW_S
    now = time.time()
    try:
        for bucket in _buckets(username=username, ip=ip):
            cache.add(f"{bucket}:since", now, timeout=window)
            cache.add(f"{bucket}:n", 0, timeout=window)
            try:
                cache.incr(f"{bucket}:n")
            except ValueError:  # the window ended between add() and incr()
                cache.set(f"{bucket}:n", 1, timeout=window)
    except Exception:
        logger.warning("login failure not counted: cache unavailable", exc_info=True)


def login_success_record(*, username: str) -> None:
    """A successful login clears the username's failures."""
    bucket = _bucket("user", username.strip().casefold())
    try:
        cache.delete_many([f"{bucket}:n", f"{bucket}:since"])
    except Exception:
        logger.warning("login failures not cleared: cache unavailable", exc_info=True)
