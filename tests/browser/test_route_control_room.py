"""The route change page in a browser: the confirmation dialog of "Check health" posts and lands back on
the page with the probe's result, and a target row's Drain button drains that target (CSRF and all)."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from accounts.models import User
from proxy.models import RouteTarget
from tests.browser.conftest import login, screenshot
from tests.live_server import LiveServer
from tests.proxy.fake_upstream import FakeUpstream
from tests.routes.factories import RouteFactory, RouteTargetFactory


def test_an_operator_runs_the_health_check_and_drains_a_target_from_the_route_page(
    page: Page, site: LiveServer, staff_login: tuple[User, str], fake_upstream: FakeUpstream
) -> None:
    route = RouteFactory(name="orders", health_check={"path": "/v1/models", "timeout_s": 2})
    target = RouteTargetFactory(route=route, url=fake_upstream.root_url)
    login(page, *staff_login)
    page.goto(f"/admin/proxy/route/{route.pk}/change/")
    screenshot(page, "route-control-room")

    page.get_by_role("link", name="Check health").first.click()
    dialog = page.locator("#dialog")
    expect(dialog).to_be_visible()
    with page.expect_navigation(wait_until="domcontentloaded"):
        dialog.get_by_role("button", name="Run").click()
    expect(page.get_by_text(re.compile(rf"{re.escape(fake_upstream.root_url)}: ok, HTTP 200, \d+ ms"))).to_be_visible()
    screenshot(page, "route-health-check-done")

    with page.expect_navigation(wait_until="domcontentloaded"):
        page.get_by_role("button", name="Drain").click()
    expect(page.get_by_text(f"Target {fake_upstream.root_url} drained")).to_be_visible()
    target.refresh_from_db()
    assert target.health == RouteTarget.Health.DRAINED
