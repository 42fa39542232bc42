"""Auth endpoints, mounted at ``/auth/`` (no trailing slashes: APPEND_SLASH is off)."""

from django.urls import path

from accounts import apis

urlpatterns = [
    path("register", apis.RegisterView.as_view(), name="auth-register"),
    path("login", apis.LoginView.as_view(), name="auth-login"),
    path("refresh", apis.RefreshView.as_view(), name="auth-refresh"),
    path("logout", apis.LogoutView.as_view(), name="auth-logout"),
    path("me", apis.MeView.as_view(), name="auth-me"),
]
