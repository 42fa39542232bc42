"""Settings for a gateway whose limiter has a Redis of its own (tests/limits/test_processes.py).

Everything of ``apiforge.settings``, except that the cache and the channel layer use ``CACHE_REDIS_URL``
instead of ``REDIS_URL``: the limiter (``proxy.edge.limits``, which reads ``REDIS_URL``) can then be made
unreachable while key verification and the catalogs, which read the cache on the request path, are not.
"""

import os

from apiforge.settings import *  # noqa: F403
from apiforge.settings import CACHE_KEY_PREFIX, CACHES

_CACHE_REDIS_URL = os.environ["CACHE_REDIS_URL"]
CACHES["default"]["LOCATION"] = _CACHE_REDIS_URL
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [_CACHE_REDIS_URL], "prefix": f"{CACHE_KEY_PREFIX}:asgi"},
    }
}
