"""The upstream change page in a browser: the panel shows an open breaker, "Reset circuit breakers" asks in a
dialog, posts, and lands back on the page with the breaker closed; "Test connection" shows the status and time."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from accounts.models import User
from proxy.edge.breaker import BreakerPolicy, breaker_failure, breaker_view, deployment_key
from proxy.models import Deployment
from tests.browser.conftest import login, screenshot
from tests.live_server import LiveServer
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import model_make, upstream_make


def test_an_operator_resets_the_breakers_and_tests_the_connection_from_the_upstream_page(
    page: Page, site: LiveServer, staff_login: tuple[User, str], fake_upstream: FakeUpstream
) -> None:
    upstream = upstream_make(name="primary", base_url=fake_upstream.base_url, api_key="sk-browser-" + "k" * 24)
    deployment = Deployment.objects.get(model=model_make("gpt-a", upstream, upstream_model="a-1"))
    model_make("gpt-b", upstream, upstream_model="b-1")
    key = deployment_key(deployment.pk)
    breaker_failure(key, BreakerPolicy(failure_threshold=1, cooldown_s=upstream.breaker_cooldown_s))
    login(page, *staff_login)

    page.goto(f"/admin/proxy/upstream/{upstream.pk}/change/")
    expect(page.locator(f'tr[data-deployment="{key}"]')).to_have_attribute("data-breaker", "open")
    screenshot(page, "upstream-control-room")

    page.get_by_text("Reset circuit breakers").first.click()
    dialog = page.locator("#dialog")
    expect(dialog).to_be_visible()
    with page.expect_navigation(wait_until="domcontentloaded"):
        dialog.get_by_role("button", name="Reset").click()
    expect(page.get_by_text("primary: 2 breaker(s) reset, 1 of them open or half-open before.")).to_be_visible()
    expect(page.locator(f'tr[data-deployment="{key}"]')).to_have_attribute("data-breaker", "closed")
    assert breaker_view(key).state == "closed"

    page.get_by_text("Test connection").first.click()
    expect(dialog).to_be_visible()
    with page.expect_navigation(wait_until="domcontentloaded"):
        dialog.get_by_role("button", name="Test").click()
    expect(page.get_by_text(re.compile(r"primary: GET .*/v1/models answered 200 in \d+ ms\."))).to_be_visible()
    screenshot(page, "upstream-connection-tested")


def test_an_operator_orders_a_models_fallbacks_with_the_drop_downs(
    page: Page, site: LiveServer, staff_login: tuple[User, str]
) -> None:
    upstream = upstream_make(name="primary", base_url="http://127.0.0.1:9/v1")
    model = model_make("gpt-main", upstream)
    for name in ("gpt-b", "gpt-c", "gpt-d"):
        model_make(name, upstream)
    login(page, *staff_login)
    page.goto("/admin/proxy/upstream/")
    screenshot(page, "upstream-changelist")

    page.goto(f"/admin/proxy/model/{model.pk}/change/")
    page.select_option("select[name=fallbacks_0]", "gpt-d")
    page.select_option("select[name=fallbacks_1]", "gpt-b")
    screenshot(page, "model-fallbacks")
    with page.expect_navigation(wait_until="domcontentloaded"):
        page.get_by_role("button", name="Save and continue editing").click()

    expect(page.locator("select[name=fallbacks_0]")).to_have_value("gpt-d")
    expect(page.locator("select[name=fallbacks_1]")).to_have_value("gpt-b")
    model.refresh_from_db()
    assert model.fallbacks == ["gpt-d", "gpt-b"]
