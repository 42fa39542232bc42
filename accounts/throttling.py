"""Brute-force throttles on the cache: login attempts (every login path) and registrations per IP.

Login. ``accounts.backends.ThrottledModelBackend`` calls ``login_attempt_reserve()``
*before* it checks a password, so ``django.contrib.auth.authenticate()`` is throttled
for every caller (``/auth/login``, the admin's login form, anything added later):
one lockout covers them all. An attempt is reserved with one atomic cache ``INCR``
per counter (atomic in Redis and in ``LocMemCache``), so concurrent guesses cannot
all slip past the limit: of N parallel wrong passwords at most the limit are hashed,
the rest are refused without touching the hasher. The counters:

- per username, and per username + client IP: ``LOGIN_THROTTLE_FAILURES``;
- per client IP, across usernames: ``LOGIN_THROTTLE_IP_FAILURES`` (much higher, so a
  few typos behind one NAT address do not lock out everyone behind it).

Each counter's window starts at its first attempt and lasts ``LOGIN_THROTTLE_WINDOW_S``.
A refused attempt gives its reservations back (it counts nowhere and does not extend
the lock); a successful one clears the username's counters and gives back its IP
reservation, so in effect only failures count. ``Retry-After`` is the time left in the
window of the counter that refused.

Registration. ``registration_attempt_reserve()`` counts every POST /auth/register per
client IP, ``REGISTRATION_THROTTLE_RATE`` per ``REGISTRATION_THROTTLE_WINDOW_S``, with
the same atomic counter.

If the cache is unreachable nothing is throttled and a warning is logged: availability
over a second line of defence.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from accounts.exceptions import LoginThrottled, RegistrationThrottled

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Counter:
    key: str
    limit: int
    clear_on_success: bool  # the username's counters are cleared; the IP's reservation is only given back


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """The reservations one login attempt holds: pass it to ``login_attempt_succeeded()`` on success."""

    counters: tuple[_Counter, ...] = ()


def _key(kind: str, value: str) -> str:
    # Hashed: usernames may hold characters that are not safe in cache keys.
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    return f"throttle:{kind}:{digest}"


def _login_counters(*, username: str, ip: str | None) -> list[_Counter]:
    name = username.strip().casefold()
    failures = settings.LOGIN_THROTTLE_FAILURES
    counters = [_Counter(_key("login-user", name), failures, clear_on_success=True)]
    if ip:
        counters.append(_Counter(_key("login-user-ip", f"{name}\0{ip}"), failures, clear_on_success=True))
        counters.append(_Counter(_key("login-ip", ip), settings.LOGIN_THROTTLE_IP_FAILURES, clear_on_success=False))
    return counters


def _hit(key: str, window: int) -> int:
    """Add one to the counter at ``key`` atomically and return the new count (a new window starts at 1)."""
    while True:
        # add() is a no-op while the window runs; it only starts a new one.
        cache.add(f"{key}:since", time.time(), timeout=window)
        if cache.add(f"{key}:n", 1, timeout=window):
            return 1
        try:
            return int(cache.incr(f"{key}:n"))
        except ValueError:  # the window ended between add() and incr(): start the next one
            continue


def _give_back(key: str) -> None:
    try:
        cache.decr(f"{key}:n")
    except ValueError:  # the window has ended meanwhile: nothing left to give back
        pass


def _retry_after(key: str, window: int) -> int:
    since = cache.get(f"{key}:since")
    if since is None:
        return window
    return max(math.ceil(float(since) + window - time.time()), 1)


def login_attempt_reserve(*, username: str, ip: str | None) -> LoginAttempt:
    """Count one login attempt before its password is checked.

    Raises ``LoginThrottled`` (with ``retry_after``) when the username, the username
    from this IP, or the IP has used up its attempts; nothing stays counted then.
    """
    window = settings.LOGIN_THROTTLE_WINDOW_S
    held: list[_Counter] = []
    try:
        for counter in _login_counters(username=username, ip=ip):
            count = _hit(counter.key, window)
            held.append(counter)
            if count > counter.limit:
                retry_after = _retry_after(counter.key, window)
                for taken in held:
                    _give_back(taken.key)
                raise LoginThrottled(
                    f"Too many failed login attempts. Try again in {retry_after} seconds.", retry_after=retry_after
                )
    except LoginThrottled:
        raise
    except Exception:
        logger.warning("login throttle skipped: cache unavailable", exc_info=True)
    return LoginAttempt(tuple(held))


def login_attempt_succeeded(attempt: LoginAttempt) -> None:
    """The password was right: clear the username's counters and give back the IP's reservation.

    The IP's count is not cleared, so an attacker cannot reset it by logging into an account of their own.
    """
    try:
        cleared = [c.key for c in attempt.counters if c.clear_on_success]
        cache.delete_many([f"{key}:{part}" for key in cleared for part in ("n", "since")])
        for counter in attempt.counters:
            if not counter.clear_on_success:
                _give_back(counter.key)
    except Exception:
        logger.warning("login failures not cleared: cache unavailable", exc_info=True)


def login_attempt_abandoned(attempt: LoginAttempt) -> None:
    """The check itself failed (an error, not a wrong password): give every reservation back."""
    try:
        for counter in attempt.counters:
            _give_back(counter.key)
    except Exception:
        logger.warning("login attempt not given back: cache unavailable", exc_info=True)


def registration_attempt_reserve(*, ip: str | None) -> None:
    """Count one registration attempt from ``ip``; raises ``RegistrationThrottled`` over the rate."""
    if not ip:
        return
    window = settings.REGISTRATION_THROTTLE_WINDOW_S
    key = _key("register-ip", ip)
    try:
        count = _hit(key, window)
        retry_after = _retry_after(key, window) if count > settings.REGISTRATION_THROTTLE_RATE else 0
    except Exception:
        logger.warning("registration throttle skipped: cache unavailable", exc_info=True)
        return
    if retry_after:
        raise RegistrationThrottled(
            f"Too many registrations from this address. Try again in {retry_after} seconds.", retry_after=retry_after
        )
