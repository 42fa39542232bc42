"""Keys management API, mounted at ``/api/``: ``keys/``, ``keys/{id}/``, ``keys/{id}/rotate/``."""

from rest_framework.routers import SimpleRouter

from keys.apis import ApiKeyViewSet

router = SimpleRouter()
router.register("keys", ApiKeyViewSet, basename="apikey")

urlpatterns = router.urls
