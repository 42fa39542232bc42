from django.apps import AppConfig


class GatewayStatsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "gateway_stats"
