import asyncio

from django.apps import AppConfig


async def _usage_emitter_start() -> None:
    from gateway_stats.usage import emitter

    # Started with the server, not on the first call: spools left by a process that died are replayed now.
    # (Not in the test suite, whose tests flush themselves: autostart is off there.)
    if emitter.autostart:
        emitter.start()


def _emitter_stop_and_close() -> None:
    from django.db import connections

    from gateway_stats.usage import emitter

    try:
        emitter.stop()
    finally:
        # The last flush may write (keys' last_used_at, the ledger) from this executor thread: give its
        # connections back (to the pool, on PostgreSQL), or every server stop in a process would keep one.
        connections.close_all()


async def _usage_emitter_stop() -> None:
    # Joins the emitter's thread (a last flush to the sinks): off the event loop.
    await asyncio.to_thread(_emitter_stop_and_close)


class GatewayStatsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "gateway_stats"
    verbose_name = "Traffic and audit"  # the admin\'s breadcrumbs and app index

    def ready(self) -> None:
        from django.conf import settings

        from apiforge.lifespan import AppHooks, lifespan_hooks_register
        from gateway_stats.transport import ledger_transport
        from gateway_stats.usage import emitter, usage_sink_register, usage_tick_register

        emitter.flush_interval = settings.USAGE_FLUSH_INTERVAL_S
        emitter.max_queue = settings.USAGE_MAX_QUEUE
        # The ledger first (before the keys app's sink, registered earlier): every other sink sees events that
        # are already on their way to it.
        usage_sink_register(ledger_transport)
        emitter.sinks.remove(ledger_transport)
        emitter.sinks.insert(0, ledger_transport)
        usage_tick_register(ledger_transport.tick)
        lifespan_hooks_register(AppHooks("gateway_stats", start=_usage_emitter_start, stop=_usage_emitter_stop))

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
