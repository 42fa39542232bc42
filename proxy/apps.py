from django.apps import AppConfig


class ProxyConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "proxy"
    verbose_name = "Upstreams, models and routes"  # the admin\'s breadcrumbs and app index

    def ready(self) -> None:
        from apiforge.lifespan import AppHooks, lifespan_hooks_register
        from keys.scopes import scope_checker_register, scope_lister_register
        from proxy.catalog import catalog_rows_reader_register
        from proxy.edge.jwt_auth import jwt_user_reader_register
        from proxy.edge.runtime import proxy_start, proxy_stop
        from proxy.gateway_catalog import gateway_rows_reader_register
        from proxy.selectors import (
            catalog_rows,
            gateway_rows,
            jwt_user_row,
            model_names,
            model_names_unknown,
            route_names,
        )

        # Start: the breaker/health state sync and the health checker; stop: those, then the upstream pool,
        # before gateway_stats' usage emitter stops (INSTALLED_APPS order).
        lifespan_hooks_register(AppHooks("proxy", start=proxy_start, stop=proxy_stop))
        # No broker (the embedded default): no beat either, so the process sweeps expired route leases itself.
        from proxy.lease_sweeper import lease_sweeper_start, lease_sweeper_stop

        lifespan_hooks_register(AppHooks("proxy.leases", start=lease_sweeper_start, stop=lease_sweeper_stop))
        # ... and rebuilds the limiter's budget counters from the ledger (at start-up, then periodically).
        from proxy.limit_reconciler import limit_reconciler_start, limit_reconciler_stop

        lifespan_hooks_register(AppHooks("proxy.limits", start=limit_reconciler_start, stop=limit_reconciler_stop))

        # The hot path's catalogs read the database (on a miss) only through these readers.
        catalog_rows_reader_register(catalog_rows)
        gateway_rows_reader_register(gateway_rows)
        jwt_user_reader_register(jwt_user_row)

        # The keys services check that the models a key names exist; the names are this app's data. Route names
        # are not checked: a key names the route it will register itself (routes come and go with their services).
        scope_checker_register("models", model_names_unknown)
        # What the key admin offers to choose from.
        scope_lister_register("models", model_names)
        scope_lister_register("routes", route_names)
