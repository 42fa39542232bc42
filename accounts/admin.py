"""Django admin for accounts: users, the throttled admin login form, and read-only JWT token lists.

- Users: Django's UserAdmin plus the email, display name and the user's limits (shared by all their keys).
  Every user it writes (add, change, password, delete) carries the admin's request as ``_audit_request``,
  for the audit trail's receivers (``gateway_stats.receivers``, which this app may not import) to record
  who did it and from where.
- The admin's login form turns ``LoginThrottled`` (raised by ``authenticate()`` itself,
  see ``accounts.backends``) into a form error: the admin shares the API's lockout.
- simplejwt's token_blacklist admins show the full refresh token, which anyone with
  view permission could use; they are replaced by read-only ones that show the jti,
  user, dates and whether the token is blacklisted, never the token itself.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import UsernameField
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

# Imported first so that its registrations exist to be replaced below, whatever the app order.
from rest_framework_simplejwt.token_blacklist import admin as token_blacklist_admin
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from unfold.admin import ModelAdmin
from unfold.forms import AdminPasswordChangeForm, AuthenticationForm, UserChangeForm, UserCreationForm

from accounts.exceptions import LoginThrottled
from accounts.models import User


class UserCreationAdminForm(UserCreationForm):
    class Meta:
        model = User
        fields = ("username", "email", "display_name")
        field_classes = {"username": UsernameField}


class UserChangeAdminForm(UserChangeForm):
    class Meta:
        model = User
        fields = "__all__"
        field_classes = {"username": UsernameField}


@admin.register(User)
class UserAdmin(DjangoUserAdmin, ModelAdmin):
    form = UserChangeAdminForm
    add_form = UserCreationAdminForm
    change_password_form = AdminPasswordChangeForm
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Personal info", {"fields": ("email", "display_name", "first_name", "last_name")}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        (
            "Limits",
            {
                "fields": ("rpm_limit", "budget_cost", "budget_period"),
                "description": "Shared by all of this user's API keys: their calls count together against these, "
                "on top of each key's own limits. Empty = no limit.",
            },
        ),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (
            None,
            {
                "classes": ("wide",),
                "fields": ("username", "email", "display_name", "usable_password", "password1", "password2"),
            },
        ),
    )
    list_display = ("username", "email", "display_name", "is_staff", "is_active", "date_joined", "last_login")
    list_filter = ("is_staff", "is_superuser", "is_active", "groups", "date_joined", "last_login")
    search_fields = ("username", "email", "display_name", "first_name", "last_name")
    ordering = ("username",)
    readonly_fields = ("last_login", "date_joined")

    # --- who writes, for the audit trail -----------------------------------------------------------
    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Any:
        # The change, password and delete views all fetch their user here.
        user = super().get_object(request, object_id, from_field)
        if user is not None:
            user._audit_request = request
        return user

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        obj._audit_request = request
        super().save_model(request, obj, form, change)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        # One by one (the bulk delete would load fresh instances, without the request).
        for user in queryset:
            user._audit_request = request  # type: ignore[attr-defined]
            user.delete()


class ThrottledAdminAuthenticationForm(AuthenticationForm):
    """The admin login form: a locked-out username or address gets the throttle's message, not a password check."""

    def clean(self) -> dict[str, Any]:
        try:
            return super().clean()
        except LoginThrottled as exc:
            raise ValidationError(exc.detail, code="throttled") from None


admin.site.login_form = ThrottledAdminAuthenticationForm


class _ReadOnlyAdmin(ModelAdmin):
    actions = None

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


for _model in (OutstandingToken, BlacklistedToken):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)
del token_blacklist_admin  # only imported for its registrations


@admin.register(OutstandingToken)
class OutstandingTokenAdmin(_ReadOnlyAdmin):
    # Never the `token` field: the encoded refresh token is a live credential.
    list_display = ("jti", "user", "created_at", "expires_at", "blacklisted")
    fields = list_display
    readonly_fields = list_display
    list_filter = ("created_at", "expires_at")
    search_fields = ("jti", "user__username")
    ordering = ("-created_at",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[OutstandingToken]:
        return super().get_queryset(request).select_related("user", "blacklistedtoken")

    @admin.display(boolean=True, description="blacklisted")
    def blacklisted(self, obj: OutstandingToken) -> bool:
        return hasattr(obj, "blacklistedtoken")


@admin.register(BlacklistedToken)
class BlacklistedTokenAdmin(_ReadOnlyAdmin):
    list_display = ("jti", "user", "created_at", "expires_at", "blacklisted_at")
    fields = list_display
    readonly_fields = list_display
    list_filter = ("blacklisted_at",)
    search_fields = ("token__jti", "token__user__username")
    ordering = ("-blacklisted_at",)
    list_select_related = ("token__user",)

    @admin.display(description="jti", ordering="token__jti")
    def jti(self, obj: BlacklistedToken) -> str:
        return obj.token.jti

    @admin.display(description="user", ordering="token__user")
    def user(self, obj: BlacklistedToken) -> Any:
        return obj.token.user

    @admin.display(description="created at", ordering="token__created_at")
    def created_at(self, obj: BlacklistedToken) -> Any:
        return obj.token.created_at

    @admin.display(description="expires at", ordering="token__expires_at")
    def expires_at(self, obj: BlacklistedToken) -> Any:
        return obj.token.expires_at
