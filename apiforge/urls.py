"""URL wiring: the landing page, admin, auth, management API, docs, health, and the proxy's Django views."""

from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from apiforge import health, metrics, views

urlpatterns = [
    path("", views.landing, name="landing"),
    path("admin/", admin.site.urls),
    path("auth/", include("accounts.urls")),
    path("api/", include("keys.urls")),
    path("api/", include("proxy.urls")),
    path("api/", include("gateway_stats.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("redoc", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("health", health.health, name="health"),
    path("health/ready", health.health_ready, name="health-ready"),
    path("metrics", metrics.metrics, name="metrics"),
    path("v1/", include("proxy.openai_urls")),
]

# Development (DEBUG) only: static files (admin, Swagger UI/ReDoc from the sidecar) for `make run`'s uvicorn.
urlpatterns += staticfiles_urlpatterns()

handler400 = "apiforge.errors.handler400"
handler403 = "apiforge.errors.handler403"
handler404 = "apiforge.errors.handler404"
handler500 = "apiforge.errors.handler500"
