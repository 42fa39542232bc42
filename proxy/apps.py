from django.apps import AppConfig


class ProxyConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "proxy"

    def ready(self) -> None:
        # Registers the catalog's cache invalidation on model writes.
        from proxy import catalog  # noqa: F401
