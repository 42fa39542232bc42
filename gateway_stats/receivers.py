"""Audit receivers: logins, failed logins and logouts, and writes of users, wherever they happen.

Sessions and tokens: ``django.contrib.auth``'s ``user_logged_in`` / ``user_login_failed`` / ``user_logged_out``,
sent by the admin's login and logout (Django's ``login()``/``logout()``/``authenticate()``) and by
``/auth/login`` and ``/auth/logout`` (``accounts.services``). A failed login names the account only when the
username typed is one: an unknown "username" may be a password typed in the wrong box, so it is not stored.
Passwords never reach the trail (Django hands the receivers the credentials with the password masked anyway).

Users are managed in the admin (there is no management API for them). ``accounts`` may not import this app, so
the admin's writes of users are audited from the user model's signals (``post_save``, ``post_delete``, and
``m2m_changed`` for groups and permissions): the admin attaches its request to each user it saves or deletes, as
``_audit_request`` (the idiom django-simple-history uses for its ``_history_user``), which says who did it and
from where, and marks the write as a management write. Saves without it are not management writes and are not
recorded: a self-registration (logged by ``accounts``), a login's ``last_login``, the password hasher's silent
upgrade of a hash. ``changes`` holds ``[old, new]`` per field, never the password hash: a new password is
``"password": "changed"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models import Model
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save
from django.http import HttpRequest

from apiforge.audit import audit_context
from apiforge.client_ip import client_ip
from gateway_stats.services import audit_record

AUDIT_REQUEST_ATTRIBUTE = "_audit_request"  # set by accounts.admin on the users it writes
_BEFORE_ATTRIBUTE = "_audit_before"
# Never audited as values: the password hash (a change is noted as such), and last_login (moved by every login).
_UNAUDITED_FIELDS = frozenset({"id", "password", "last_login"})
_USERNAME_MAX = 150


def _object_type(model: type[Model]) -> str:
    return f"{model._meta.app_label}.{model._meta.model_name}"


def _ip(request: HttpRequest | None) -> str | None:
    return None if request is None else client_ip(request)


def _path(request: HttpRequest | None) -> dict[str, str]:
    return {} if request is None else {"path": request.path}


# --- logins and logouts -----------------------------------------------------------------------------


def user_login_audit(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    audit_record(
        actor=user,
        action="user.login",
        object_type=_object_type(get_user_model()),
        object_id=user.pk,
        object_repr=user.get_username(),
        changes=_path(request),
        ip_address=_ip(request),
    )


def user_login_failed_audit(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    user_model = get_user_model()
    username = credentials.get(user_model.USERNAME_FIELD)
    account = None
    if isinstance(username, str) and username:
        try:
            account = user_model._default_manager.get_by_natural_key(username[:_USERNAME_MAX])
        except user_model.DoesNotExist:
            account = None
    details: dict[str, Any] = {**_path(request), "username_known": account is not None}
    audit_record(
        actor=None,
        action="user.login_failed",
        object_type=_object_type(user_model),
        object_id=account.pk if account is not None else "",
        object_repr=account.get_username() if account is not None else "",
        changes=details,
        ip_address=_ip(request),
    )


def user_logout_audit(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    if user is None or not getattr(user, "pk", None):  # a logout without a session: nobody logged out
        return
    audit_record(
        actor=user,
        action="user.logout",
        object_type=_object_type(get_user_model()),
        object_id=user.pk,
        object_repr=user.get_username(),
        changes=_path(request),
        ip_address=_ip(request),
    )


# --- writes of users --------------------------------------------------------------------------------


def _audited_fields(model: type[Model]) -> list[str]:
    return [field.attname for field in model._meta.concrete_fields if field.name not in _UNAUDITED_FIELDS]


def _request(instance: Any) -> HttpRequest | None:
    request = getattr(instance, AUDIT_REQUEST_ATTRIBUTE, None)
    return request if isinstance(request, HttpRequest) else None


def _audit_user(instance: Any, request: HttpRequest, action: str, changes: dict[str, Any]) -> None:
    context = audit_context(request)
    actor = context.actor
    if action == "user.delete" and actor is not None and actor.pk == instance.pk:
        actor = None  # deleting oneself: the trail cannot point at a user who is gone
    audit_record(
        actor=actor,
        action=action,
        object_type=_object_type(type(instance)),
        object_id=instance.pk,
        object_repr=instance.get_username(),
        changes=changes,
        ip_address=context.ip_address,
    )


def user_pre_save_audit(sender: type[Model], instance: Any, raw: bool, **kwargs: Any) -> None:
    """Read the row as it was, to tell what the admin's save changes (one query)."""
    if raw or instance._state.adding or instance.pk is None or _request(instance) is None:
        return
    before = sender._default_manager.filter(pk=instance.pk).values(*_audited_fields(sender), "password").first()
    setattr(instance, _BEFORE_ATTRIBUTE, before)


def user_post_save_audit(sender: type[Model], instance: Any, created: bool, raw: bool, **kwargs: Any) -> None:
    request = _request(instance)
    if raw or request is None:
        return
    fields = _audited_fields(sender)
    if created:
        _audit_user(instance, request, "user.create", {field: getattr(instance, field) for field in fields})
        return
    before = instance.__dict__.pop(_BEFORE_ATTRIBUTE, None)
    if before is None:
        return
    changes: dict[str, Any] = {}
    for field in fields:
        if before[field] != getattr(instance, field):
            changes[field] = [before[field], getattr(instance, field)]
    if before["password"] != instance.password:
        changes["password"] = "changed"  # noqa: S105 - that it changed, never what to
    if changes:
        _audit_user(instance, request, "user.update", changes)


def user_post_delete_audit(sender: type[Model], instance: Any, **kwargs: Any) -> None:
    request = _request(instance)
    if request is not None:
        _audit_user(instance, request, "user.delete", {"username": instance.get_username()})


def _related_names(model: type[Model], pks: Iterable[Any]) -> list[str]:
    """Groups by name, permissions as ``app_label.codename``: what a reader of the trail recognises."""
    rows = model._default_manager.filter(pk__in=list(pks))
    if model._meta.label == "auth.Permission":
        return sorted(f"{app}.{codename}" for app, codename in rows.values_list("content_type__app_label", "codename"))
    return sorted(str(row) for row in rows)


def user_m2m_changed_audit(
    sender: type[Model],
    instance: Any,
    action: str,
    reverse: bool,
    model: type[Model],
    pk_set: set[Any] | None,
    **kwargs: Any,
) -> None:
    """Groups and permissions given to or taken from a user (through the user: the admin's user form)."""
    request = _request(instance)
    if reverse or request is None or not isinstance(instance, get_user_model()):
        return
    user_model = type(instance)
    field = next(f.name for f in user_model._meta.many_to_many if f.remote_field.through is sender)
    if action == "pre_clear":
        # After the clear nobody can tell what was there: note it now (the admin itself never clears).
        pks = getattr(instance, field).values_list("pk", flat=True)
        removed = _related_names(model, pks)
        if removed:
            _audit_user(instance, request, "user.update", {field: {"removed": removed}})
        return
    if action not in {"post_add", "post_remove"} or not pk_set:
        return
    direction = "added" if action == "post_add" else "removed"
    _audit_user(instance, request, "user.update", {field: {direction: _related_names(model, pk_set)}})


def receivers_connect() -> None:
    """Connect the receivers (``GatewayStatsConfig.ready``); each once, whatever calls this again."""
    user_model = get_user_model()
    user_logged_in.connect(user_login_audit, dispatch_uid="gateway_stats.audit.login")
    user_login_failed.connect(user_login_failed_audit, dispatch_uid="gateway_stats.audit.login_failed")
    user_logged_out.connect(user_logout_audit, dispatch_uid="gateway_stats.audit.logout")
    pre_save.connect(user_pre_save_audit, sender=user_model, dispatch_uid="gateway_stats.audit.user_pre_save")
    post_save.connect(user_post_save_audit, sender=user_model, dispatch_uid="gateway_stats.audit.user_post_save")
    post_delete.connect(user_post_delete_audit, sender=user_model, dispatch_uid="gateway_stats.audit.user_delete")
    for field in user_model._meta.many_to_many:
        m2m_changed.connect(
            user_m2m_changed_audit,
            sender=field.remote_field.through,
            dispatch_uid=f"gateway_stats.audit.user_{field.name}",
        )
