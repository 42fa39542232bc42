"""Management API routes of the proxy app, mounted under ``/api/``."""

from rest_framework.routers import DefaultRouter

from proxy.apis import PublicModelViewSet, UpstreamViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("upstreams", UpstreamViewSet, basename="upstream")
router.register("models", PublicModelViewSet, basename="model")

urlpatterns = router.urls
