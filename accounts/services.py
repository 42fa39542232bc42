"""Account workflows: registration, JWT login and logout, the development superuser.

Field problems are raised as Django ``ValidationError`` keyed by field name, and
login failures as the domain errors of ``accounts.exceptions``; ``apiforge.errors``
turns both into the JSON error shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.contrib.auth import authenticate
from django.contrib.auth.models import update_last_login
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.exceptions import InvalidCredentials, LoginThrottled
from accounts.models import User
from accounts.throttling import login_failure_record, login_success_record, login_throttle_check

logger = logging.getLogger("accounts")


@dataclass(frozen=True, slots=True)
class TokenPair:
    access: str
    refresh: str


def _duplicate_errors(*, username: str, email: str) -> dict[str, list[str]]:
    # Case-insensitive, like the database constraints: "Bob" and "bob" are one user.
    errors: dict[str, list[str]] = {}
    if User.objects.filter(username__iexact=username).exists():
        errors["username"] = ["A user with that username already exists."]
    if User.objects.filter(email__iexact=email).exists():
        errors["email"] = ["A user with that email address already exists."]
    return errors


@transaction.atomic
def user_register(*, username: str, email: str, password: str, display_name: str = "") -> User:
    """Create an ordinary user; Django's password validators apply. Raises ``ValidationError``."""
    user = User(username=username, email=User.objects.normalize_email(email), display_name=display_name)
    errors: dict[str, list[str]] = {}
    try:
        # clean() normalizes username and email; uniqueness is checked below, case-insensitively.
        user.full_clean(exclude=["password"], validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        errors.update(exc.message_dict)
    for field, messages in _duplicate_errors(username=user.username, email=user.email).items():
        errors.setdefault(field, []).extend(messages)
    try:
        validate_password(password, user)
    except ValidationError as exc:
        errors["password"] = list(exc.messages)
    if errors:
        raise ValidationError(errors)

    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        # Lost a race with a concurrent registration of the same name or email.
        raise ValidationError(
            _duplicate_errors(username=user.username, email=user.email)
            or {"username": ["A user with that username already exists."]}
        ) from None
    logger.info("user registered: id=%s username=%s", user.pk, user.username)
    return user


def _token_pair_issue(user: User) -> TokenPair:
    refresh = RefreshToken.for_user(user)
    if jwt_settings.UPDATE_LAST_LOGIN:
        update_last_login(User, user)
    return TokenPair(access=str(refresh.access_token), refresh=str(refresh))


def user_login(*, username: str, password: str, ip: str | None) -> TokenPair:
    """Check the credentials and issue a JWT pair.

    Raises ``LoginThrottled`` when the username or the IP has too many recent
    failures, ``InvalidCredentials`` for a wrong username/password or an
    inactive account.
    """
    try:
        login_throttle_check(username=username, ip=ip)
    except LoginThrottled:
        logger.warning("login throttled: username=%s ip=%s", username, ip)
        raise
    user = authenticate(username=username, password=password)
    if not isinstance(user, User):
        login_failure_record(username=username, ip=ip)
        logger.warning("login failed: username=%s ip=%s", username, ip)
        raise InvalidCredentials()
    login_success_record(username=username)
    tokens = _token_pair_issue(user)
    logger.info("login succeeded: id=%s username=%s ip=%s", user.pk, user.username, ip)
    return tokens


def user_logout(*, user: User, refresh: str) -> None:
    """Blacklist ``refresh`` so it can never be used again. Raises ``ValidationError`` for a bad token."""
    try:
        token = RefreshToken(refresh)  # type: ignore[arg-type]  # accepts the encoded token string
    except TokenError as exc:
        raise ValidationError({"refresh": [str(exc)]}) from None
    if str(token.get(jwt_settings.USER_ID_CLAIM)) != str(user.pk):
        raise ValidationError({"refresh": ["This token does not belong to the authenticated user."]})
    token.blacklist()
    logger.info("logout: id=%s username=%s", user.pk, user.username)


@transaction.atomic
def superuser_ensure(*, username: str, email: str, password: str) -> tuple[User, bool]:
    """The first superuser, created with these credentials when none exists yet.

    Returns ``(user, created)``. Refuses (``ValidationError``) to promote an existing
    ordinary user who happens to have the wanted username.
    """
    existing = User.objects.filter(is_superuser=True).order_by("pk").first()
    if existing is not None:
        return existing, False
    if User.objects.filter(username__iexact=username).exists():
        raise ValidationError(
            {"username": [f"A user named {username!r} exists but is not a superuser; choose another username."]}
        )
    user = User.objects.create_superuser(username=username, email=email, password=password)
    logger.info("superuser created: id=%s username=%s", user.pk, user.username)
    return user, True
