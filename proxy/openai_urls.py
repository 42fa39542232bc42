"""``/v1/`` URLs for the Django-side proxy views (see ``proxy/views.py``)."""

from django.urls import path

from proxy.views import openai_proxy

urlpatterns = [path("<path:path>", openai_proxy, name="openai-proxy")]
