"""``/`` answers with a small landing page linking to the admin, the docs and health (it used to be a 404)."""

import secrets

from django.test import Client

from tests.factories import UserFactory


def test_the_root_is_a_landing_page_with_the_links_a_visitor_needs(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    body = response.content.decode()
    for link in ('href="/admin/"', 'href="/docs"', 'href="/health"'):
        assert link in body
    assert "<title>APIForge</title>" in body


def test_the_landing_page_only_answers_reads(client: Client) -> None:
    response = client.post("/")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"


def test_the_admin_is_branded_and_view_site_points_at_the_landing_page(admin_client: Client) -> None:
    body = admin_client.get("/admin/").content.decode()
    assert "APIForge" in body
    assert "Django administration" not in body
    assert 'href="/"' in body


def test_a_login_started_at_the_admin_login_page_lands_on_the_dashboard(db: None, client: Client) -> None:
    # A password of its own: pytest-django's admin_user has "password", which the secret-leak check would then
    # find in every later page that says "password".
    passphrase = secrets.token_urlsafe(24)
    UserFactory(username="root", superuser=True, password=passphrase)
    response = client.post("/admin/login/", {"username": "root", "password": passphrase})
    assert response.status_code == 302
    assert response["Location"] == "/admin/"
