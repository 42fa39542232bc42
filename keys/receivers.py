"""Signal receivers: keep cached key verdicts in step with the user fields verification reads."""

from __future__ import annotations

from typing import Any

from keys.services import key_cache_invalidate_for_owner


def owner_saved(sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any) -> None:
    """A user's ``is_active`` decides whether their keys work: drop their cached entries when it may change."""
    if created or (update_fields is not None and "is_active" not in update_fields):
        return  # e.g. the last_login update on every login
    key_cache_invalidate_for_owner(owner_id=instance.pk)
