"""URLs of the statistics app under ``/api/``: stats, the request log, the audit trail."""

from django.urls import URLPattern, URLResolver, path  # noqa: F401  (the views below add their paths)
from rest_framework.routers import SimpleRouter

from gateway_stats.apis import ErrorsStatsApi, SummaryStatsApi, UsageStatsApi
from gateway_stats.records_api import AuditEventViewSet, UsageRecordViewSet

# The request log and the audit trail: /api/usage/, /api/usage/{request_id}/, /api/audit/, /api/audit/{id}/.
records = SimpleRouter()
records.register("usage", UsageRecordViewSet, basename="usage-record")
records.register("audit", AuditEventViewSet, basename="audit-event")

urlpatterns: list[URLPattern | URLResolver] = [
    *records.urls,
    path("stats/usage", UsageStatsApi.as_view(), name="stats-usage"),
    path("stats/summary", SummaryStatsApi.as_view(), name="stats-summary"),
    path("stats/errors", ErrorsStatsApi.as_view(), name="stats-errors"),
]
