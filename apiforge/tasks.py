"""Platform tasks: a ping that proves a worker consumes from the broker."""

from celery import shared_task


@shared_task(name="apiforge.ping", ignore_result=False, time_limit=10)
def ping(value: str) -> str:
    """Echo ``value`` back: used by tests and operators to check the broker round trip."""
    return f"pong:{value}"
