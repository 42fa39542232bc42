"""Serializer pieces every app's API shares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers


class StrictFieldsMixin(serializers.Serializer):
    """Refuse fields the operation does not accept (unknown or read-only) with a field error each.

    Silently ignoring a misspelt ``rpm_limt`` (or a route's ``ttl``) would leave an object without what its owner
    meant to set.
    """

    refuses_unknown_fields = True  # the schema says so: additionalProperties false (apiforge/schema.py)

    def to_internal_value(self, data: Any) -> Any:
        errors: dict[str, Any] = {}
        if isinstance(data, Mapping):
            accepted = {field.field_name for field in self._writable_fields}
            errors.update({name: ["Unknown or read-only field."] for name in data if name not in accepted})
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if not isinstance(exc.detail, dict):
                raise
            errors = {**exc.detail, **errors}
            value = None
        if errors:
            raise serializers.ValidationError(errors)
        return value
