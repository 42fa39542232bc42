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
