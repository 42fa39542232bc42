from django.apps import AppConfig


class ProxyConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "proxy"

    def ready(self) -> None:
        from apiforge.lifespan import AppHooks, lifespan_hooks_register
        from proxy.upstream_client import upstream_session_close

        # Closed at shutdown before gateway_stats' usage emitter stops (INSTALLED_APPS order).
        lifespan_hooks_register(AppHooks("proxy", stop=upstream_session_close))
        from keys.scopes import scope_checker_register
        from proxy.catalog import catalog_rows_reader_register
        from proxy.selectors import catalog_rows, model_names_unknown

        # The hot path's catalog reads the database (on a miss) only through this reader.
        catalog_rows_reader_register(catalog_rows)

        # The keys services check that the models a key names exist; the names are this app's data.
        scope_checker_register("models", model_names_unknown)
