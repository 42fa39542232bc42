"""ASGI entry point: ``apiforge.asgi:application``.

One seam decides which requests take the lean proxy path: HTTP requests under
``/v1/`` and ``/gw/`` go to ``proxy.asgi.proxy_app`` (no Django request cycle:
key and model lookups come from in-process caches), everything else to
Django. WebSockets go to Channels consumers; lifespan events run each app's
start and stop hooks (``apiforge/lifespan.py``).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apiforge.settings")
django_asgi_app = get_asgi_application()

# Imports that touch models must come after Django is set up.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from apiforge.lifespan import lifespan  # noqa: E402
from apiforge.routing import websocket_urlpatterns  # noqa: E402
from proxy.asgi import ProxyDispatcher  # noqa: E402

http_app = ProxyDispatcher(django_asgi_app, lean_openai=settings.PROXY_LEAN_ASGI)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
        "lifespan": lifespan,
    }
)
