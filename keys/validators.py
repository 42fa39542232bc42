"""Field validators of ``ApiKey``: run by the model's ``full_clean`` (services, admin forms).

Format only: whether a named model (or route) exists is another app's data, checked by the
keys services through ``keys.scopes``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from django.core.exceptions import ValidationError

MAX_LIST_ITEMS = 100
METADATA_MAX_BYTES = 4096
# Route names as the routes API will accept them. The Route model arrives with a later
# issue; until then only the format is checked, existence cannot be.
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError("Must be a list of strings.", code="invalid")
    if len(value) > MAX_LIST_ITEMS:
        raise ValidationError(f"At most {MAX_LIST_ITEMS} entries.", code="max_length")
    return value


def validate_ip_allowlist(value: Any) -> None:
    """Each entry is an IPv4 or IPv6 address or network (host bits allowed, e.g. ``10.0.0.1/8``)."""
    bad = []
    for item in _string_list(value):
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            bad.append(item)
    if bad:
        raise ValidationError(
            "Not a valid IPv4 or IPv6 network: %(bad)s.", code="invalid_cidr", params={"bad": ", ".join(bad)}
        )


def validate_allowed_models(value: Any) -> None:
    """A list of model names (whether they exist is checked by the services, see ``keys.scopes``)."""
    _string_list(value)


def validate_allowed_routes(value: Any) -> None:
    """Each entry is a well-formed route name (existence is checked once routes exist)."""
    bad = [item for item in _string_list(value) if not ROUTE_NAME.match(item)]
    if bad:
        raise ValidationError("Not a valid route name: %(bad)s.", code="invalid_route", params={"bad": ", ".join(bad)})


def validate_metadata(value: Any) -> None:
    """A JSON object of modest size."""
    if not isinstance(value, dict):
        raise ValidationError("Must be a JSON object.", code="invalid")
    if len(json.dumps(value, default=str)) > METADATA_MAX_BYTES:
        raise ValidationError(f"At most {METADATA_MAX_BYTES} bytes of JSON.", code="max_length")
