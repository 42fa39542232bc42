"""A URLconf for tests/platform/test_errors.py: the project's URLs plus views that fail on purpose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest
from django.urls import path
from rest_framework import exceptions
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.views import APIView

from apiforge.errors import DomainError
from apiforge.urls import urlpatterns as project_urlpatterns


class Conflict(DomainError):
    status_code = 409
    default_code = "conflict"
    default_detail = "That name is taken."


class SlowDown(DomainError):
    status_code = 429
    default_code = "slow_down"


class Unauthorized(DomainError):
    status_code = 401
    default_code = "who_are_you"


FAILURES: dict[str, Callable[[], Exception]] = {
    "drf-permission": lambda: exceptions.PermissionDenied(),
    "django-permission": lambda: DjangoPermissionDenied("secret reason"),
    "http404": lambda: Http404("No Widget matches the given query."),
    "domain": lambda: Conflict(),
    "domain-retry": lambda: SlowDown("Later.", retry_after=7),
    "domain-401": lambda: Unauthorized("Say who you are."),
    "django-validation": lambda: DjangoValidationError({"name": ["Bad name."], "__all__": ["Bad combination."]}),
    "django-validation-plain": lambda: DjangoValidationError("Bad everything."),
    "drf-validation-list": lambda: exceptions.ValidationError(["First problem.", "Second problem."]),
    "drf-list-detail": lambda: exceptions.PermissionDenied(detail=["Not yours.", "Ask the owner."]),
    "crash": lambda: RuntimeError("boom"),
}


class FailingView(APIView):
    authentication_classes = ()
    permission_classes = (AllowAny,)

    def get(self, request: Request, kind: str) -> Any:
        raise FAILURES[kind]()


def plain_django_crash(request: HttpRequest) -> NoReturn:
    raise RuntimeError("boom outside DRF")


def plain_django_forbidden(request: HttpRequest) -> NoReturn:
    raise DjangoPermissionDenied("not for you")


urlpatterns = [
    path("_test/fail/<str:kind>", FailingView.as_view()),
    path("_test/plain-crash", plain_django_crash),
    path("_test/plain-forbidden", plain_django_forbidden),
    *project_urlpatterns,
]

handler400 = "apiforge.errors.handler400"
handler403 = "apiforge.errors.handler403"
handler404 = "apiforge.errors.handler404"
handler500 = "apiforge.errors.handler500"
