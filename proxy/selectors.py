"""Reads of the proxy app that other apps may use (keys validates scopes with these)."""

from __future__ import annotations

from collections.abc import Iterable

from proxy.models import Model


def model_names_unknown(names: Iterable[str]) -> list[str]:
    """The names in ``names`` that are not a configured public model, in the given order."""
    wanted = list(dict.fromkeys(names))
    known = set(Model.objects.filter(name__in=wanted).values_list("name", flat=True))
    return [name for name in wanted if name not in known]
