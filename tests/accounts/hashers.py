"""A password hasher for the throttle tests: MD5 (cheap), but slow to verify and counting every check.

The pause widens the window in which concurrent guesses overlap, as a real hash's
half-second would; the count says how many passwords were actually checked.
"""

from __future__ import annotations

import threading
import time

from django.contrib.auth.hashers import MD5PasswordHasher

VERIFY_PAUSE_S = 0.05


class CountingSlowHasher(MD5PasswordHasher):
    checks = 0
    _lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls.checks = 0

    def verify(self, password: str, encoded: str) -> bool:
        with CountingSlowHasher._lock:
            CountingSlowHasher.checks += 1
        time.sleep(VERIFY_PAUSE_S)
        return super().verify(password, encoded)
