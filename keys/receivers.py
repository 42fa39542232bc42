"""Signal receivers: keep cached key verdicts in step with the user fields verification reads."""

from __future__ import annotations

from typing import Any

from keys.services import key_cache_invalidate_for_owner

# The user fields a key's cached verdict holds: ``is_active`` (whether the keys work at all) and the user's own
# limits, which every key's policy carries (``keys.selectors.key_record_by_digest``).
OWNER_FIELDS = frozenset({"is_active", "rpm_limit", "budget_cost", "budget_period"})


def owner_saved(sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any) -> None:
    """A user's ``is_active`` and limits are part of their keys' cached policies: drop those entries when a save
    may change them (any save but one whose ``update_fields`` names none of them)."""
    if created or (update_fields is not None and OWNER_FIELDS.isdisjoint(update_fields)):
        return  # e.g. the last_login update on every login
    key_cache_invalidate_for_owner(owner_id=instance.pk)
