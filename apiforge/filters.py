"""Filtering of the management API's lists: a stricter django-filter backend, and an id filter.

django-filter reads ``?is_active=maybe`` as "no filter" and answers the unfiltered list; the
schema says the parameter is a boolean, so such a value is a 400 naming the parameter (an empty
value is no filter, as the schema says). ``IdFilter`` filters on an integer id (``NumberFilter``
takes decimals, up to 1e50, and the schema would call it a number). A query parameter given
twice (``?search=a&search=b``) is a 400 too.
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
        # Every query parameter of the API takes one value: which of several would count is anyone's guess.
        errors: dict[str, list[str]] = {
            name: ["Give this parameter once."] for name, values in request.query_params.lists() if len(values) > 1
        }
        for name, field in filterset.filters.items():
            values = request.query_params.getlist(name)
            # An empty value is no filter (``?is_active=``), as for every query parameter (see apiforge/schema.py).
            if isinstance(field, BooleanFilter) and any(value and value not in BOOLEAN_VALUES for value in values):
                errors[name] = ["Must be true or false."]
        if errors:
            raise serializers.ValidationError(errors)
        return filterset


@extend_schema_field(OpenApiTypes.INT)
class IdFilter(NumberFilter):
    """An integer id (``?owner=42``), documented as an integer; beyond a 64-bit id it is a 400, not a database
    overflow (SQLite and PostgreSQL both refuse such a parameter)."""

    field_class = forms.IntegerField

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", -(2**63))
        kwargs.setdefault("max_value", 2**63 - 1)
        super().__init__(**kwargs)
