"""The Django admin for users (list, search, filter, add, change) and for JWT tokens (never the token itself)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(UserFactory(username="root", superuser=True))
    return client


def test_the_user_changelist_shows_the_extra_columns_with_a_constant_query_count(staff_client: Client) -> None:
    UserFactory.create_batch(3)
    with CaptureQueriesContext(connection) as few:
        assert staff_client.get("/admin/accounts/user/").status_code == 200
    UserFactory.create_batch(20)

    with CaptureQueriesContext(connection) as many:
        response = staff_client.get("/admin/accounts/user/")

    assert response.status_code == 200
    content = response.content.decode()
    assert "Display name" in content
    assert "Email address" in content
    assert len(many) == len(few)


def test_the_changelist_searches_by_email_and_display_name_and_filters_by_staff(staff_client: Client) -> None:
    UserFactory(username="carol", email="carol@corp.example", display_name="Carol Danvers")
    UserFactory(username="dave", email="dave@example.com", display_name="Dave")

    by_email = staff_client.get("/admin/accounts/user/", {"q": "corp.example"}).content.decode()
    by_name = staff_client.get("/admin/accounts/user/", {"q": "Danvers"}).content.decode()
    staff_only = staff_client.get("/admin/accounts/user/", {"is_staff__exact": "1"}).content.decode()

    assert "carol@corp.example" in by_email
    assert "dave@example.com" not in by_email
    assert "carol@corp.example" in by_name
    assert "dave@example.com" not in by_name
    assert "root@example.com" in staff_only
    assert "dave@example.com" not in staff_only


def test_staff_add_a_user_with_email_and_display_name(staff_client: Client) -> None:
    response = staff_client.post(
        "/admin/accounts/user/add/",
        {
            "username": "erin",
            "email": "erin@example.com",
            "display_name": "Erin",
            "usable_password": "true",
            "password1": "a-Long-and-unusual-passphrase-7",
            "password2": "a-Long-and-unusual-passphrase-7",
        },
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    erin = User.objects.get(username="erin")
    assert erin.email == "erin@example.com"
    assert erin.display_name == "Erin"
    assert erin.check_password("a-Long-and-unusual-passphrase-7")


def test_the_add_form_refuses_a_username_taken_in_another_case(staff_client: Client) -> None:
    UserFactory(username="frank")

    response = staff_client.post(
        "/admin/accounts/user/add/",
        {"username": "FRANK", "email": "f2@example.com", "usable_password": "false"},
    )

    assert response.status_code == 200
    assert "A user with that username already exists." in response.content.decode()
    assert User.objects.filter(username__iexact="frank").count() == 1


def test_the_change_form_edits_the_display_name(staff_client: Client) -> None:
    user = UserFactory(username="gina", display_name="Gina")

    page = staff_client.get(f"/admin/accounts/user/{user.pk}/change/")

    assert page.status_code == 200
    assert 'name="display_name"' in page.content.decode()


# --- JWT tokens: listed by jti, never the token itself ------------------------------------------------


@pytest.fixture
def refresh_tokens() -> list[RefreshToken]:
    owner = UserFactory(username="holder")
    return [RefreshToken.for_user(owner) for _ in range(2)]


def test_the_outstanding_token_admin_shows_the_jti_and_never_the_token(
    staff_client: Client, refresh_tokens: list[RefreshToken]
) -> None:
    live, revoked = refresh_tokens
    revoked.blacklist()
    outstanding = OutstandingToken.objects.get(jti=live["jti"])

    changelist = staff_client.get("/admin/token_blacklist/outstandingtoken/").content.decode()
    change = staff_client.get(f"/admin/token_blacklist/outstandingtoken/{outstanding.pk}/change/")

    assert change.status_code == 200
    page = change.content.decode()
    for html in (changelist, page):
        assert str(live) not in html
        assert outstanding.token not in html
        assert str(revoked) not in html
        assert live["jti"] in html
        assert "holder" in html
    assert revoked["jti"] in changelist
    assert 'name="token"' not in page


def test_the_token_admins_cannot_search_by_token_nor_add_change_or_delete(
    staff_client: Client, refresh_tokens: list[RefreshToken]
) -> None:
    live = refresh_tokens[0]
    outstanding = OutstandingToken.objects.get(jti=live["jti"])

    by_token = staff_client.get("/admin/token_blacklist/outstandingtoken/", {"q": str(live)}).content.decode()
    by_jti = staff_client.get("/admin/token_blacklist/outstandingtoken/", {"q": live["jti"]}).content.decode()

    assert live["jti"] not in by_token
    assert live["jti"] in by_jti
    assert staff_client.get("/admin/token_blacklist/outstandingtoken/add/").status_code == 403
    url = f"/admin/token_blacklist/outstandingtoken/{outstanding.pk}/"
    assert staff_client.post(url + "delete/", {"post": "yes"}).status_code == 403
    assert staff_client.post(url + "change/", {"jti": "x"}).status_code == 403
    assert OutstandingToken.objects.filter(pk=outstanding.pk, token=outstanding.token).exists()


def test_the_blacklisted_token_admin_shows_the_jti_and_never_the_token(
    staff_client: Client, refresh_tokens: list[RefreshToken]
) -> None:
    revoked = refresh_tokens[1]
    revoked.blacklist()
    blacklisted = BlacklistedToken.objects.get(token__jti=revoked["jti"])

    changelist = staff_client.get("/admin/token_blacklist/blacklistedtoken/").content.decode()
    change = staff_client.get(f"/admin/token_blacklist/blacklistedtoken/{blacklisted.pk}/change/")

    assert change.status_code == 200
    for html in (changelist, change.content.decode()):
        assert str(revoked) not in html
        assert blacklisted.token.token not in html
        assert revoked["jti"] in html
        assert "holder" in html
    assert staff_client.get("/admin/token_blacklist/blacklistedtoken/add/").status_code == 403


@pytest.mark.parametrize("path", ["outstandingtoken", "blacklistedtoken"])
def test_the_token_changelists_take_a_constant_number_of_queries(staff_client: Client, path: str) -> None:
    def tokens(count: int) -> None:
        for _ in range(count):
            RefreshToken.for_user(UserFactory()).blacklist()

    tokens(2)
    with CaptureQueriesContext(connection) as few:
        assert staff_client.get(f"/admin/token_blacklist/{path}/").status_code == 200
    tokens(10)

    with CaptureQueriesContext(connection) as many:
        assert staff_client.get(f"/admin/token_blacklist/{path}/").status_code == 200

    assert len(many) == len(few)
