"""The Django admin for users: list, search, filter, add with the extra fields, change."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

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
