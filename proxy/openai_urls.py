"""``/v1/`` and ``/gw/`` URLs for the Django-side proxy views (see ``proxy/views.py``): every path under them."""

from django.urls import path

from proxy.views import openai_proxy

urlpatterns = [
    path("", openai_proxy, {"path": ""}),
    path("<path:path>", openai_proxy, name="openai-proxy"),
]
