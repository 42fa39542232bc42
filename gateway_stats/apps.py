import asyncio

from django.apps import AppConfig


async def _usage_emitter_stop() -> None:
    from gateway_stats.usage import emitter

    # Joins the emitter's thread (a last flush to the sinks): off the event loop.
    await asyncio.to_thread(emitter.stop)


class GatewayStatsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "gateway_stats"

    def ready(self) -> None:
        from apiforge.lifespan import AppHooks, lifespan_hooks_register

        lifespan_hooks_register(AppHooks("gateway_stats", stop=_usage_emitter_stop))

        # The audit trail's receivers: logins, failed logins, logouts, writes of users (gateway_stats.receivers).
        from gateway_stats.receivers import receivers_connect

        receivers_connect()

        # Metrics, access log, event bus: sinks after the ledger's, in this order; the bus stops after the
        # emitter (registered after it), so the emitter's last flush still reaches the publisher.
        from gateway_stats.access_log import usage_access_log_sink
        from gateway_stats.events import events_bus_start, events_bus_stop, usage_events_sink
        from gateway_stats.metrics import metrics_process_stop, usage_metrics_sink
        from gateway_stats.usage import usage_sink_register

        usage_sink_register(usage_metrics_sink)
        usage_sink_register(usage_access_log_sink)
        usage_sink_register(usage_events_sink)
        lifespan_hooks_register(AppHooks("gateway_stats.events", start=events_bus_start, stop=events_bus_stop))
        lifespan_hooks_register(AppHooks("gateway_stats.metrics", stop=metrics_process_stop))
