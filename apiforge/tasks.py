"""Platform tasks: a ping that proves a worker consumes from the broker."""

from celery import shared_task


# Its own limits: the soft limit may not exceed the hard one (the project default soft limit is 50 s).
@shared_task(name="apiforge.ping", ignore_result=False, soft_time_limit=5, time_limit=10)
def ping(value: str) -> str:
    """Echo ``value`` back: used by tests and operators to check the broker round trip."""
    return f"pong:{value}"
