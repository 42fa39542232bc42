"""Account workflows: registration, JWT login and logout, the development superuser.

Field problems are raised as Django ``ValidationError`` keyed by field name, and
login failures as the domain errors of ``accounts.exceptions``; ``apiforge.errors``
turns both into the JSON error shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.contrib.auth import authenticate
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.signals import user_logged_in, user_logged_out
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.http import HttpRequest
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.backends import login_client_ip
from accounts.exceptions import InvalidCredentials
from accounts.models import User

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
def user_register(
    *, username: str, email: str, password: str, display_name: str = "", hide_duplicates: bool = False
) -> User:
    """Create an ordinary user; Django's password validators apply. Raises ``ValidationError``.

    With ``hide_duplicates`` (``REGISTRATION_ENUMERATION_SAFE``), a taken username or
    email is not an error: nothing is created and the unsaved user (``pk`` None, with the
    normalized username and email) is returned, after the same password hashing, so the
    caller can answer exactly as for a new account.
    """
    user = User(username=username, email=User.objects.normalize_email(email), display_name=display_name)
    errors: dict[str, list[str]] = {}
    try:
        # clean() normalizes username and email; uniqueness is checked below, case-insensitively.
        user.full_clean(exclude=["password"], validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        errors.update(exc.message_dict)
    duplicates = _duplicate_errors(username=user.username, email=user.email)
    if not hide_duplicates:
        for field, messages in duplicates.items():
            errors.setdefault(field, []).extend(messages)
    try:
        validate_password(password, user)
    except ValidationError as exc:
        errors["password"] = list(exc.messages)
    if errors:
        raise ValidationError(errors)

    user.set_password(password)
    if duplicates:
        logger.info("registration of a taken username or email answered as a success: username=%s", user.username)
        return user
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        # Lost a race with a concurrent registration of the same name or email.
        if hide_duplicates:
            user.pk = None
            return user
        raise ValidationError(
            _duplicate_errors(username=user.username, email=user.email)
            or {"username": ["A user with that username already exists."]}
        ) from None
    logger.info("user registered: id=%s username=%s", user.pk, user.username)
    return user


def _token_pair_issue(user: User) -> TokenPair:
    refresh = RefreshToken.for_user(user)
    return TokenPair(access=str(refresh.access_token), refresh=str(refresh))


def user_login(*, username: str, password: str, request: HttpRequest | None) -> TokenPair:
    """Check the credentials and issue a JWT pair.

    ``authenticate()`` is throttled (``accounts.backends``): it raises ``LoginThrottled``
    while the username or the client IP of ``request`` is locked out, and logs failures.
    Raises ``InvalidCredentials`` for a wrong username/password or an inactive account.

    A success sends ``user_logged_in`` as Django's session ``login()`` does (a failure: ``authenticate()``
    sends ``user_login_failed``), so its receivers run for both login paths: Django's own sets ``last_login``,
    the audit trail's records the login.
    """
    user = authenticate(request, username=username, password=password)
    if not isinstance(user, User):
        raise InvalidCredentials()
    tokens = _token_pair_issue(user)
    user_logged_in.send(sender=User, request=request, user=user)
    logger.info("login succeeded: id=%s username=%s ip=%s", user.pk, user.username, login_client_ip(request))
    return tokens


def user_logout(*, user: User, refresh: str, request: HttpRequest | None = None) -> None:
    """Blacklist ``refresh`` so it can never be used again. Raises ``ValidationError`` for a bad token.

    Then sends ``user_logged_out``, as Django's session ``logout()`` does (the audit trail records it).
    """
    try:
        token = RefreshToken(refresh)  # type: ignore[arg-type]  # accepts the encoded token string
    except TokenError as exc:
        raise ValidationError({"refresh": [str(exc)]}) from None
    if str(token.get(jwt_settings.USER_ID_CLAIM)) != str(user.pk):
        raise ValidationError({"refresh": ["This token does not belong to the authenticated user."]})
    token.blacklist()
    user_logged_out.send(sender=User, request=request, user=user)
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
