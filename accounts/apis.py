"""The accounts HTTP layer: serializers and thin DRF views for ``/auth/...``.

Each view validates its input, calls one service from ``accounts.services`` and
renders the result; errors become the JSON error shape in ``apiforge.errors``.
"""

from __future__ import annotations

from typing import Any, cast

from django.conf import settings
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import NotAuthenticated
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView
from rest_framework_simplejwt.views import TokenRefreshView

from accounts.models import User
from accounts.services import user_login, user_logout, user_register
from accounts.throttling import registration_attempt_reserve
from apiforge.client_ip import client_ip
from apiforge.errors import ErrorResponseSerializer

_TAGS = ["auth"]
_ERROR = ErrorResponseSerializer


class UserSerializer(serializers.ModelSerializer[User]):
    class Meta:
        model = User
        fields = ["id", "username", "email", "display_name", "is_staff", "date_joined"]
        read_only_fields = fields


class RegisterSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    email = serializers.EmailField()
    password = serializers.CharField(write_only=True, trim_whitespace=False, style={"input_type": "password"})
    display_name = serializers.CharField(max_length=150, required=False, allow_blank=True, default="")


class LoginSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField(write_only=True, trim_whitespace=False, style={"input_type": "password"})


class RefreshSerializer(serializers.Serializer):
    refresh = serializers.CharField(help_text="A refresh token from /auth/login or /auth/refresh.")


class TokenPairSerializer(serializers.Serializer):
    access = serializers.CharField(help_text="Access token: send it as `Authorization: Bearer <access>`.")
    refresh = serializers.CharField(help_text="Refresh token: exchange it at /auth/refresh; single use.")


def _user(request: Request) -> User:
    # IsAuthenticated has run, so this holds; the check keeps the type honest.
    if not isinstance(request.user, User):
        raise NotAuthenticated()
    return request.user


class _PublicAuthView(APIView):
    """Endpoints reached without credentials (their 401s are domain errors, which carry the Bearer challenge)."""

    authentication_classes = ()
    permission_classes = (AllowAny,)


class RegistrationReceivedSerializer(serializers.ModelSerializer[User]):
    """The answer with ``REGISTRATION_ENUMERATION_SAFE`` on: the same for a new and for a taken username or email."""

    class Meta:
        model = User
        fields = ["username", "email", "display_name"]
        read_only_fields = fields


class RegisterView(_PublicAuthView):
    @extend_schema(
        operation_id="auth_register",
        summary="Register a user",
        description="Creates an ordinary user. Django's password validators apply; "
        "usernames and emails are unique regardless of case.\n\n"
        "Throttled per client address: after `REGISTRATION_THROTTLE_RATE` attempts in "
        "`REGISTRATION_THROTTLE_WINDOW_S`, answers 429 with a `Retry-After` header (seconds).\n\n"
        "With `REGISTRATION_ENUMERATION_SAFE` on, a taken username or email is not reported: the answer is "
        "201 with only `username`, `email` and `display_name` (normalized), exactly as for a new account, "
        "and no account is created; the registrant finds out by logging in. With it off (the default), the "
        "answer is 201 with the new user, and a taken username or email is a 400 field error.",
        tags=_TAGS,
        auth=[],
        request=RegisterSerializer,
        responses={
            201: UserSerializer,
            400: OpenApiResponse(_ERROR, description="Invalid input; `fields` says which and why."),
            415: OpenApiResponse(_ERROR, description="The body is not JSON."),
            429: OpenApiResponse(_ERROR, description="Too many registrations from this address; see `Retry-After`."),
        },
    )
    def post(self, request: Request) -> Response:
        registration_attempt_reserve(ip=client_ip(request))
        serializer = RegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        hide_duplicates = settings.REGISTRATION_ENUMERATION_SAFE
        user = user_register(**serializer.validated_data, hide_duplicates=hide_duplicates)
        body = RegistrationReceivedSerializer(user) if hide_duplicates else UserSerializer(user)
        return Response(body.data, status=status.HTTP_201_CREATED)


class LoginView(_PublicAuthView):
    @extend_schema(
        operation_id="auth_login",
        summary="Log in: get a JWT pair",
        description="After `LOGIN_THROTTLE_FAILURES` failures for one username (from anywhere, on any "
        "login path: this one or the admin's), or `LOGIN_THROTTLE_IP_FAILURES` from one address, answers 429 "
        "with a `Retry-After` header (seconds) until the window ends; the password is not checked meanwhile.",
        tags=_TAGS,
        auth=[],
        request=LoginSerializer,
        responses={
            200: TokenPairSerializer,
            400: OpenApiResponse(_ERROR, description="Missing fields."),
            401: OpenApiResponse(_ERROR, description="Wrong username or password, or inactive account."),
            429: OpenApiResponse(_ERROR, description="Too many failed attempts; see `Retry-After`."),
        },
        examples=[OpenApiExample("credentials", value={"username": "alice", "password": "…"}, request_only=True)],
    )
    def post(self, request: Request) -> Response:
        serializer = LoginSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        tokens = user_login(**serializer.validated_data, request=request._request)
        return Response(TokenPairSerializer(tokens).data)


class RefreshView(TokenRefreshView):
    @extend_schema(
        operation_id="auth_refresh",
        summary="Exchange a refresh token for a new pair",
        description="Refresh tokens are single use: the one sent is blacklisted and a new one returned.",
        tags=_TAGS,
        auth=[],
        request=RefreshSerializer,
        responses={
            200: TokenPairSerializer,
            400: OpenApiResponse(_ERROR, description="Missing `refresh`."),
            401: OpenApiResponse(_ERROR, description="Bad, expired or blacklisted refresh token."),
        },
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().post(request, *args, **kwargs)


class LogoutView(APIView):
    # A Bearer access token is required: no session, so no CSRF dance for API clients. The JWT class is the
    # project's (the first default: simplejwt's, naming the credential expected when an API key comes instead).
    authentication_classes = tuple(
        cast("list[type[BaseAuthentication]]", api_settings.DEFAULT_AUTHENTICATION_CLASSES[:1])
    )
    permission_classes = (IsAuthenticated,)

    @extend_schema(
        operation_id="auth_logout",
        summary="Log out: blacklist a refresh token",
        tags=_TAGS,
        request=RefreshSerializer,
        responses={
            205: OpenApiResponse(description="The refresh token is blacklisted; no body."),
            400: OpenApiResponse(_ERROR, description="Missing, bad or someone else's refresh token."),
            401: OpenApiResponse(_ERROR, description="No or bad access token."),
        },
    )
    def post(self, request: Request) -> Response:
        serializer = RefreshSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user_logout(user=_user(request), refresh=serializer.validated_data["refresh"], request=request._request)
        return Response(status=status.HTTP_205_RESET_CONTENT)


class MeView(APIView):
    permission_classes = (IsAuthenticated,)

    @extend_schema(
        operation_id="auth_me",
        summary="The current user",
        tags=_TAGS,
        responses={200: UserSerializer, 401: OpenApiResponse(_ERROR, description="Not authenticated.")},
    )
    def get(self, request: Request) -> Response:
        return Response(UserSerializer(_user(request)).data)
