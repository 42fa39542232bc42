"""Who may do what on the management API: Django's model permissions, applied as the admin applies them.

- Everyone manages their own objects (their API keys) with no model permission at all.
- Anything beyond that (other users' keys, upstreams, writing models, every model with its deployments)
  needs a staff account holding the model permission: ``view_<model>`` to read (``change_<model>`` implies
  it, as in the admin), ``add_``/``change_``/``delete_`` to write. Superusers hold every permission.
- ``is_staff`` alone grants nothing over an ordinary user, as in the admin: a staff member without the
  permission sees only their own objects and is refused staff-only endpoints.

The predicates are used by the selectors (what a user sees) and by the DRF permission classes below
(what a request may do), so the list a user gets and the writes they may make follow one rule.
"""

from __future__ import annotations

from typing import Any, Literal

from django.contrib.auth import get_permission_codename
from django.contrib.auth.models import PermissionsMixin
from django.db.models import Model
from rest_framework import permissions
from rest_framework.request import Request
from rest_framework.views import APIView

ModelAction = Literal["view", "add", "change", "delete"]

# The model permission each method needs on a collection. A POST on one object (``/keys/{id}/rotate/``)
# changes that object: ``_OBJECT_ACTIONS`` maps it to ``change``.
_METHOD_ACTIONS: dict[str, ModelAction] = {
    "GET": "view",
    "HEAD": "view",
    "OPTIONS": "view",
    "POST": "add",
    "PUT": "change",
    "PATCH": "change",
    "DELETE": "delete",
}
_OBJECT_ACTIONS: dict[str, ModelAction] = {**_METHOD_ACTIONS, "POST": "change"}


def staff_has_model_perm(user: Any, action: ModelAction, model: type[Model] | Model) -> bool:
    """Whether ``user`` is an active staff member holding ``<app_label>.<action>_<model>`` (superusers hold all).

    ``view`` is also granted by ``change``, as the admin does (``ModelAdmin.has_view_permission``).
    """
    if not (
        isinstance(user, PermissionsMixin) and getattr(user, "is_active", False) and getattr(user, "is_staff", False)
    ):
        return False
    opts = model._meta
    actions: tuple[ModelAction, ...] = ("view", "change") if action == "view" else (action,)
    return any(user.has_perm(f"{opts.app_label}.{get_permission_codename(name, opts)}") for name in actions)


def _view_model(view: APIView) -> type[Model]:
    queryset = getattr(view, "queryset", None)
    if queryset is None:
        queryset = view.get_queryset()  # type: ignore[attr-defined]
    model: type[Model] = queryset.model
    return model


def _authenticated(request: Request) -> bool:
    return bool(request.user and request.user.is_authenticated)


class StaffModelPermissions(permissions.BasePermission):
    """Staff-only endpoints: every method needs the model permission (reads, HEAD and OPTIONS: ``view``)."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not _authenticated(request):
            return False
        action = _METHOD_ACTIONS.get(request.method or "")
        return action is not None and staff_has_model_perm(request.user, action, _view_model(view))


class ReadOrStaffModelPermissions(permissions.BasePermission):
    """Any authenticated user may read (the queryset decides what they see); writes need the model permission."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not _authenticated(request):
            return False
        if request.method in permissions.SAFE_METHODS:
            return True
        action = _METHOD_ACTIONS.get(request.method or "")
        return action is not None and staff_has_model_perm(request.user, action, _view_model(view))


class OwnerOrStaffModelPermissions(permissions.BasePermission):
    """Objects with an owner: the owner may do anything to them; anyone else needs the model permission.

    Reading someone else's object needs ``view`` (the selector hides it otherwise, so it answers 404);
    PATCH/PUT and POST actions on it (rotate) need ``change``, DELETE needs ``delete`` (else 403).
    Creating is for oneself, so it needs no permission.
    """

    owner_attribute = "owner_id"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return _authenticated(request)

    def has_object_permission(self, request: Request, view: APIView, obj: Any) -> bool:
        if getattr(obj, self.owner_attribute) == request.user.pk:
            return True
        action = _OBJECT_ACTIONS.get(request.method or "")
        return action is not None and staff_has_model_perm(request.user, action, type(obj))
