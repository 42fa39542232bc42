"""Which scope names exist: a registry of checkers, filled at startup by the apps that own the names.

A key's ``allowed_models`` name things of the proxy app (``allowed_routes`` too, but route names are not
checked on purpose: a service's key names the route it is about to register itself). The keys app must not
import it (the proxy sits above keys), and a model-field validator must not query another app, so the field
validators check only the format and the keys services ask here whether the names exist. The proxy app
registers its checkers in ``ProxyConfig.ready()``; a kind without a checker accepts
every well-formed name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from django.core.exceptions import ValidationError

ScopeKind = Literal["models", "routes"]
# Returns the names that do not exist, in the given order.
ScopeChecker = Callable[[Iterable[str]], list[str]]

# The key field holding each kind of scope, and how an unknown name is reported on it.
SCOPE_FIELDS: dict[ScopeKind, str] = {"models": "allowed_models", "routes": "allowed_routes"}
_UNKNOWN: dict[ScopeKind, tuple[str, str]] = {
    "models": ("Unknown model: %(names)s.", "unknown_model"),
    "routes": ("Unknown route: %(names)s.", "unknown_route"),
}

# Returns every name of the kind that exists, sorted (the admin's choices).
ScopeLister = Callable[[], list[str]]

_checkers: dict[ScopeKind, ScopeChecker] = {}
_listers: dict[ScopeKind, ScopeLister] = {}


def scope_checker_register(kind: ScopeKind, checker: ScopeChecker) -> None:
    """Make ``checker`` the one that says which ``kind`` names are unknown (a later call replaces it)."""
    _checkers[kind] = checker


def scope_lister_register(kind: ScopeKind, lister: ScopeLister) -> None:
    """Make ``lister`` the one that lists the existing ``kind`` names (a later call replaces it)."""
    _listers[kind] = lister


def scope_names_known(kind: ScopeKind) -> list[str]:
    """The existing names of ``kind``, sorted; none when no lister is registered for the kind."""
    lister = _listers.get(kind)
    return [] if lister is None else lister()


def scope_names_unknown(kind: ScopeKind, names: Iterable[str]) -> list[str]:
    """The names of ``kind`` that do not exist; none when no checker is registered for the kind."""
    checker = _checkers.get(kind)
    if checker is None:
        return []
    return checker(names)


def scope_errors(values: Mapping[str, Any]) -> dict[str, ValidationError]:
    """Field errors for the unknown names in ``values`` (key field name -> list of names).

    Only fields present in ``values`` holding a list of strings are checked: a malformed value is
    the field validator's to report.
    """
    errors: dict[str, ValidationError] = {}
    for kind, field in SCOPE_FIELDS.items():
        names = values.get(field)
        if not names or not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            continue
        unknown = scope_names_unknown(kind, names)
        if unknown:
            message, code = _UNKNOWN[kind]
            errors[field] = ValidationError(message, code=code, params={"names": ", ".join(unknown)})
    return errors
