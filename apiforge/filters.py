"""Filtering of the management API's lists: a stricter django-filter backend, and an id filter.

django-filter reads ``?is_active=maybe`` or ``?owner=`` as "no filter" and answers the
unfiltered list; the schema says the parameter is a boolean or a number, so such a value is a
400 naming the parameter. ``IdFilter`` filters on an integer id (``NumberFilter`` takes
decimals, up to 1e50, and the schema would call it a number).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django_filters import BooleanFilter, NumberFilter
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request

BOOLEAN_VALUES = frozenset({"true", "false", "True", "False"})


class StrictDjangoFilterBackend(DjangoFilterBackend):
    def get_filterset(self, request: Request, queryset: Any, view: Any) -> Any:
        filterset = super().get_filterset(request, queryset, view)
        if filterset is None:
            return None
        errors: dict[str, list[str]] = {}
        for name, field in filterset.filters.items():
            values = request.query_params.getlist(name)
            if isinstance(field, BooleanFilter) and any(value not in BOOLEAN_VALUES for value in values):
                errors[name] = ["Must be true or false."]
            elif isinstance(field, NumberFilter) and any(not value for value in values):
                errors[name] = ["A number is required."]  # django-filter would ignore the empty value
        if errors:
            raise serializers.ValidationError(errors)
        return filterset


@extend_schema_field(OpenApiTypes.INT)
class IdFilter(NumberFilter):
    """An integer id (``?owner=42``), documented as an integer."""

    field_class = forms.IntegerField
