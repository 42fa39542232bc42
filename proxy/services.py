"""Writes of the proxy app: upstreams and models (with their deployments), each audited.

The management API and the admin call these; they hold the rules a write must
keep (an OpenAI-compatible upstream needs an http(s) base URL, extra headers may
not override what the proxy itself sets, fallbacks name other existing models).
Errors are Django ``ValidationError``s keyed by field name. Secrets (the upstream
API key, extra header values) never reach the audit trail.

Row locks are taken upstreams first, then models, each kind in one query in
primary-key order (``_models_lock``): a deployment cannot be written against an
upstream that is being deleted, and two writers whose models overlap (a rename
and the models naming the renamed one as a fallback) wait for each other instead
of deadlocking. Every write calls ``catalog_invalidate_on_commit()`` inside its
transaction, so the proxy's cached catalog follows (or the write fails with 503).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypedDict

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import ProtectedError

from gateway_stats.services import audit_record
from proxy.catalog import catalog_invalidate_on_commit
from proxy.exceptions import UpstreamInUse
from proxy.models import Deployment, Model, Upstream

HEADER_VALUE_MASK = "***"
MAX_RETRIES_LIMIT = 10
MAX_EXTRA_HEADERS = 50
MAX_HEADER_VALUE_LENGTH = 8192
# Headers the proxy sets itself (credentials, framing, hop-by-hop): an upstream may not override them.
FORBIDDEN_EXTRA_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "content-type",
        "accept-encoding",
        "host",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FORBIDDEN_VALUE_CHARS = ("\r", "\n", "\x00")

# Writable fields (the admin's forms use the same lists).
UPSTREAM_FIELDS = (
    "name",
    "kind",
    "base_url",
    "timeout_s",
    "max_retries",
    "extra_headers",
    "is_active",
    "breaker_failure_threshold",
    "breaker_cooldown_s",
)
MODEL_FIELDS = (
    "name",
    "is_active",
    "fallbacks",
    "input_price_per_1k",
    "output_price_per_1k",
    "rpm_limit",
    "tpm_limit",
    "output_tokens_estimate",
)


class UpstreamFields(TypedDict, total=False):
    """Writable upstream fields; ``api_key``: a value sets it, ``""`` clears it, absent keeps it."""

    name: str
    kind: str
    base_url: str
    api_key: str
    timeout_s: float
    max_retries: int
    extra_headers: dict[str, str]
    is_active: bool
    breaker_failure_threshold: int
    breaker_cooldown_s: float


class ModelFields(TypedDict, total=False):
    name: str
    is_active: bool
    fallbacks: list[str]
    input_price_per_1k: Decimal
    output_price_per_1k: Decimal
    rpm_limit: int | None
    tpm_limit: int | None
    output_tokens_estimate: int


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One wanted deployment of a model; identified by (upstream, upstream_model)."""

    upstream: Upstream
    upstream_model: str
    weight: int = 1
    is_active: bool = True


def _audit(
    action: str,
    object_id: int,
    object_repr: str,
    changes: dict[str, Any],
    actor: AbstractBaseUser | None,
    ip_address: str | None,
) -> None:
    """One audit event for a write on an upstream or a model; ``changes`` never hold secrets."""
    audit_record(
        actor=actor,
        action=action,
        object_type=f"proxy.{action.split('.', 1)[0]}",
        object_id=object_id,
        object_repr=object_repr,
        changes=changes,
        ip_address=ip_address,
    )


# --- Upstreams ---------------------------------------------------------------


def extra_headers_masked(headers: Mapping[str, Any]) -> dict[str, str]:
    """The header names with every value replaced by the mask (values may carry secrets)."""
    return dict.fromkeys(headers, HEADER_VALUE_MASK)


def extra_headers_merge(*, current: Mapping[str, str], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """``wanted`` where a masked value keeps the current value of that header (case-insensitive name).

    Lets a client send back what it read (names with masked values) without erasing the secrets.
    """
    by_lower = {name.lower(): value for name, value in current.items()}
    merged: dict[str, Any] = {}
    for name, value in wanted.items():
        if value == HEADER_VALUE_MASK and isinstance(name, str) and name.lower() in by_lower:
            merged[name] = by_lower[name.lower()]
        else:
            merged[name] = value
    return merged


def _extra_headers_errors(headers: object) -> list[str]:
    if not isinstance(headers, dict):
        return ["Must be an object mapping header names to string values."]
    if len(headers) > MAX_EXTRA_HEADERS:
        return [f"At most {MAX_EXTRA_HEADERS} headers."]
    errors: list[str] = []
    seen: set[str] = set()
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            errors.append(f"“{name}” is not a valid header name.")
            continue
        lowered = name.lower()
        if lowered in FORBIDDEN_EXTRA_HEADERS:
            errors.append(f"“{name}” is set by the proxy and cannot be overridden.")
        if lowered in seen:
            errors.append(f"“{name}” is given more than once.")
        seen.add(lowered)
        if not isinstance(value, str):
            errors.append(f"The value of “{name}” must be a string.")
        elif value == HEADER_VALUE_MASK:
            errors.append(f"Give a value for “{name}” (the mask keeps only an existing header's value).")
        elif any(char in value for char in _FORBIDDEN_VALUE_CHARS):
            errors.append(f"The value of “{name}” contains a line break or NUL.")
        elif len(value) > MAX_HEADER_VALUE_LENGTH:
            errors.append(f"The value of “{name}” is longer than {MAX_HEADER_VALUE_LENGTH} characters.")
    return errors


def upstream_validate(*, upstream: Upstream, model_checks: bool = True) -> None:
    """Raise ``ValidationError`` (by field) unless ``upstream`` may be saved as it is.

    ``model_checks=False`` leaves out the model's own field, unique and constraint checks
    (a ``ModelForm`` runs those itself).
    """
    errors: dict[str, list[str]] = {}
    if model_checks:
        try:
            upstream.full_clean(exclude=["api_key_encrypted"])
        except ValidationError as exc:
            errors.update({field: list(messages) for field, messages in exc.message_dict.items()})
    if upstream.kind == Upstream.Kind.OPENAI and not upstream.base_url:
        errors.setdefault("base_url", []).append("An OpenAI-compatible upstream needs a base URL.")
    elif upstream.base_url and not upstream.base_url.lower().startswith(("http://", "https://")):
        errors.setdefault("base_url", []).append("The base URL must start with http:// or https://.")
    if upstream.timeout_s is not None and upstream.timeout_s <= 0:
        errors.setdefault("timeout_s", []).append("Must be greater than 0.")
    if upstream.max_retries is not None and not 0 <= upstream.max_retries <= MAX_RETRIES_LIMIT:
        errors.setdefault("max_retries", []).append(f"Must be between 0 and {MAX_RETRIES_LIMIT}.")
    if upstream.breaker_failure_threshold is not None and upstream.breaker_failure_threshold < 1:
        errors.setdefault("breaker_failure_threshold", []).append("Must be at least 1.")
    header_errors = _extra_headers_errors(upstream.extra_headers)
    if header_errors:
        errors.setdefault("extra_headers", []).extend(header_errors)
    # The check constraint repeats the base URL rule; its generic message adds nothing to ours.
    if "base_url" in errors:
        errors.pop("__all__", None)
    if errors:
        raise ValidationError(errors)


def _upstream_snapshot(upstream: Upstream) -> dict[str, Any]:
    snapshot = {field: getattr(upstream, field) for field in UPSTREAM_FIELDS}
    snapshot["extra_headers"] = extra_headers_masked(upstream.extra_headers or {})
    return snapshot


@transaction.atomic
def upstream_create(
    *, data: UpstreamFields, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> Upstream:
    """Create an upstream; its API key (if any) is stored encrypted."""
    fields = {key: value for key, value in data.items() if key in UPSTREAM_FIELDS}
    upstream = Upstream(**fields)
    upstream.api_key = data.get("api_key", "")
    upstream_validate(upstream=upstream)
    catalog_invalidate_on_commit()
    upstream.save()
    changes = _upstream_snapshot(upstream)
    changes["api_key"] = "set" if upstream.has_api_key else "unset"
    _audit("upstream.create", upstream.pk, str(upstream), changes, actor, ip_address)
    return upstream


@transaction.atomic
def upstream_update(
    *, upstream: Upstream, data: UpstreamFields, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> Upstream:
    """Change the given fields of ``upstream``; see ``UpstreamFields`` for the API key."""
    locked = Upstream.objects.select_for_update().get(pk=upstream.pk)
    before = _upstream_snapshot(locked)
    headers_before = dict(locked.extra_headers or {})
    had_key = locked.has_api_key
    for field in UPSTREAM_FIELDS:
        if field not in data:
            continue
        value: Any = data[field]  # type: ignore[literal-required]
        if field == "extra_headers" and isinstance(value, Mapping):
            value = extra_headers_merge(current=locked.extra_headers or {}, wanted=value)
        setattr(locked, field, value)
    key_change = ""
    if "api_key" in data:
        new_key = data["api_key"]
        if not new_key:
            key_change = "cleared" if had_key else ""
        elif new_key != locked.api_key:
            key_change = "changed" if had_key else "set"
        if key_change:
            locked.api_key = new_key
    upstream_validate(upstream=locked)
    after = _upstream_snapshot(locked)
    changes: dict[str, Any] = {field: [before[field], after[field]] for field in after if before[field] != after[field]}
    if "extra_headers" not in changes and locked.extra_headers != headers_before:
        # Same names, different (secret) values: say that they changed, never what they are.
        changes["extra_headers"] = "values changed"
    if key_change:
        changes["api_key"] = key_change
    if not changes:
        return locked
    catalog_invalidate_on_commit()
    locked.save()
    _audit("upstream.update", locked.pk, str(locked), changes, actor, ip_address)
    return locked


@transaction.atomic
def upstream_delete(
    *, upstream: Upstream, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> None:
    """Delete ``upstream``; raises ``UpstreamInUse`` while a deployment still routes to it."""
    locked = Upstream.objects.select_for_update().get(pk=upstream.pk)
    model_names = sorted(set(locked.deployments.values_list("model__name", flat=True)))
    if model_names:
        raise UpstreamInUse(upstream_name=locked.name, model_names=model_names)
    pk, name = locked.pk, locked.name
    catalog_invalidate_on_commit()
    try:
        locked.delete()
    except ProtectedError as exc:  # a deployment appeared between the check and the delete
        names = sorted({str(obj.model.name) for obj in exc.protected_objects if isinstance(obj, Deployment)})
        raise UpstreamInUse(upstream_name=name, model_names=names) from exc
    _audit("upstream.delete", pk, name, {"name": name}, actor, ip_address)


# --- Models ------------------------------------------------------------------


def model_validate(*, model: Model, model_checks: bool = True) -> None:
    """Raise ``ValidationError`` (by field) unless ``model`` may be saved as it is (see ``upstream_validate``)."""
    errors: dict[str, list[str]] = {}
    if model_checks:
        try:
            model.full_clean()
        except ValidationError as exc:
            errors.update({field: list(messages) for field, messages in exc.message_dict.items()})
    fallbacks = model.fallbacks
    if not isinstance(fallbacks, list) or not all(isinstance(name, str) for name in fallbacks):
        errors.setdefault("fallbacks", []).append("Must be a list of model names.")
    else:
        fallback_errors: list[str] = []
        if model.name in fallbacks:
            fallback_errors.append("A model cannot be its own fallback.")
        if len(set(fallbacks)) != len(fallbacks):
            fallback_errors.append("Each fallback may be listed once.")
        others = [name for name in dict.fromkeys(fallbacks) if name != model.name]
        known = set(Model.objects.filter(name__in=others).exclude(pk=model.pk).values_list("name", flat=True))
        fallback_errors.extend(f"Unknown model “{name}”." for name in others if name not in known)
        if fallback_errors:
            errors.setdefault("fallbacks", []).extend(fallback_errors)
    if errors:
        raise ValidationError(errors)


def deployments_errors(deployments: Sequence[DeploymentSpec]) -> list[str]:
    """What is wrong with a model's wanted deployments on their own (the admin's inline formset asks too)."""
    keys = [(spec.upstream.pk, spec.upstream_model) for spec in deployments]
    messages: list[str] = []
    if len(set(keys)) != len(keys):
        messages.append("Each (upstream, upstream_model) pair may appear once.")
    for spec in deployments:
        if not spec.upstream_model:
            messages.append("upstream_model may not be blank.")
        if spec.weight < 0:
            messages.append("weight must be 0 or more.")
    return messages


def _deployments_validate(deployments: Sequence[DeploymentSpec]) -> None:
    messages = deployments_errors(deployments)
    wanted = sorted({spec.upstream.pk for spec in deployments})
    # Lock the upstreams (primary-key order) so none is deleted under the new deployments.
    present = set(
        Upstream.objects.select_for_update().filter(pk__in=wanted).order_by("pk").values_list("pk", flat=True)
    )
    messages.extend(
        f"Unknown upstream “{spec.upstream.name}”." for spec in deployments if spec.upstream.pk not in present
    )
    if messages:
        raise ValidationError({"deployments": list(dict.fromkeys(messages))})


def _deployments_replace(*, model: Model, deployments: Sequence[DeploymentSpec]) -> list[dict[str, Any]]:
    """Make ``model``'s deployments exactly ``deployments``, keeping the ids of those that stay."""
    existing = {(dep.upstream_id, dep.upstream_model): dep for dep in model.deployments.select_related("upstream")}
    wanted = {(spec.upstream.pk, spec.upstream_model): spec for spec in deployments}
    for key, dep in existing.items():
        if key not in wanted:
            dep.delete()
    for key, spec in wanted.items():
        current = existing.get(key)
        if current is None:
            Deployment.objects.create(
                model=model,
                upstream=spec.upstream,
                upstream_model=spec.upstream_model,
                weight=spec.weight,
                is_active=spec.is_active,
            )
        elif (current.weight, current.is_active) != (spec.weight, spec.is_active):
            current.weight, current.is_active = spec.weight, spec.is_active
            current.save(update_fields=["weight", "is_active"])
    return _deployments_snapshot(model)


def _deployments_snapshot(model: Model) -> list[dict[str, Any]]:
    return [
        {
            "upstream": dep.upstream.name,
            "upstream_model": dep.upstream_model,
            "weight": dep.weight,
            "is_active": dep.is_active,
        }
        for dep in model.deployments.select_related("upstream").order_by("pk")
    ]


def _fallback_holders(name: str, *, exclude_pk: int) -> set[int]:
    """The other models naming ``name`` among their fallbacks."""
    return {m.pk for m in Model.objects.exclude(pk=exclude_pk).only("pk", "fallbacks") if name in m.fallbacks}


def _models_lock(*, model: Model, with_fallback_holders: bool) -> tuple[Model, list[Model]]:
    """Lock ``model`` (and, when asked, the models naming it as a fallback) in one query, in primary-key order.

    Returns the locked model and the locked holders. Every model write locks this way, so a rename of A
    (which locks the models naming A) and a rename of B named by A wait for each other instead of each
    holding one row and waiting for the other. Should a model start naming ``model`` between the read of
    the holders and the lock, the lock is taken again over the larger set.
    """
    pks = {model.pk, *(_fallback_holders(model.name, exclude_pk=model.pk) if with_fallback_holders else ())}
    while True:
        rows = {row.pk: row for row in Model.objects.select_for_update().filter(pk__in=pks).order_by("pk")}
        if model.pk not in rows:
            raise Model.DoesNotExist("Model matching query does not exist.")
        locked = rows[model.pk]
        if not with_fallback_holders:
            return locked, []
        holders = _fallback_holders(locked.name, exclude_pk=locked.pk)
        if holders <= rows.keys():
            return locked, [rows[pk] for pk in sorted(holders)]
        pks |= holders


def _fallbacks_rewrite(*, old_name: str, new_name: str | None, holders: Sequence[Model]) -> list[str]:
    """Rename (or, with ``new_name=None``, drop) ``old_name`` in the fallbacks of ``holders`` (locked)."""
    touched: list[str] = []
    for other in holders:
        rewritten: list[str] = []
        for name in other.fallbacks:
            replacement = name if name != old_name else new_name
            if replacement is not None and replacement != other.name and replacement not in rewritten:
                rewritten.append(replacement)
        other.fallbacks = rewritten
        other.save(update_fields=["fallbacks", "updated_at"])
        touched.append(other.name)
    return touched


def _model_snapshot(model: Model) -> dict[str, Any]:
    return {field: getattr(model, field) for field in MODEL_FIELDS}


@transaction.atomic
def model_create(
    *,
    data: ModelFields,
    deployments: Sequence[DeploymentSpec],
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
) -> Model:
    """Create a public model with its deployments."""
    _deployments_validate(deployments)
    model = Model(**{key: value for key, value in data.items() if key in MODEL_FIELDS})
    model_validate(model=model)
    catalog_invalidate_on_commit()
    model.save()
    changes = _model_snapshot(model)
    changes["deployments"] = _deployments_replace(model=model, deployments=deployments)
    _audit("model.create", model.pk, str(model), changes, actor, ip_address)
    return model


@transaction.atomic
def model_update(
    *,
    model: Model,
    data: ModelFields,
    deployments: Sequence[DeploymentSpec] | None = None,
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
) -> Model:
    """Change the given fields; ``deployments`` (when given) replaces the model's deployments.

    A rename is carried into the other models' fallbacks.
    """
    if deployments is not None:
        _deployments_validate(deployments)
    # A name in ``data`` may rename: lock the models naming the stored name along with this one.
    locked, holders = _models_lock(model=model, with_fallback_holders="name" in data)
    before = _model_snapshot(locked)
    before_deployments = _deployments_snapshot(locked) if deployments is not None else []
    for field in MODEL_FIELDS:
        if field in data:
            setattr(locked, field, data[field])  # type: ignore[literal-required]
    model_validate(model=locked)
    after = _model_snapshot(locked)
    changes: dict[str, Any] = {field: [before[field], after[field]] for field in after if before[field] != after[field]}
    if changes:
        locked.save()
    if deployments is not None:
        after_deployments = _deployments_replace(model=locked, deployments=deployments)
        if after_deployments != before_deployments:
            changes["deployments"] = [before_deployments, after_deployments]
    if before["name"] != locked.name:
        renamed_in = _fallbacks_rewrite(old_name=before["name"], new_name=locked.name, holders=holders)
        if renamed_in:
            changes["fallback_renamed_in"] = renamed_in
    if not changes:
        return locked
    catalog_invalidate_on_commit()
    _audit("model.update", locked.pk, str(locked), changes, actor, ip_address)
    return locked


@transaction.atomic
def model_delete(*, model: Model, actor: AbstractBaseUser | None = None, ip_address: str | None = None) -> None:
    """Delete ``model`` and its deployments, and drop it from the other models' fallbacks."""
    locked, holders = _models_lock(model=model, with_fallback_holders=True)
    pk, name = locked.pk, locked.name
    deployments = _deployments_snapshot(locked)
    catalog_invalidate_on_commit()
    removed_from = _fallbacks_rewrite(old_name=name, new_name=None, holders=holders)
    locked.delete()  # the deployments cascade
    changes: dict[str, Any] = {"name": name, "deployments": deployments}
    if removed_from:
        changes["fallback_removed_from"] = removed_from
    _audit("model.delete", pk, name, changes, actor, ip_address)


@transaction.atomic
def model_deployments_update(
    *,
    model: Model,
    deployments: Sequence[DeploymentSpec],
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
) -> Model:
    """Make ``model``'s deployments exactly ``deployments`` (the admin's inline rows, saved after the model)."""
    _deployments_validate(deployments)
    locked, _ = _models_lock(model=model, with_fallback_holders=False)
    before = _deployments_snapshot(locked)
    after = _deployments_replace(model=locked, deployments=deployments)
    if after != before:
        catalog_invalidate_on_commit()
        _audit("model.deployments_update", locked.pk, str(locked), {"deployments": after}, actor, ip_address)
    return locked
