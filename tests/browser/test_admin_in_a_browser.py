"""The admin as a staff member sees it, in headless Chromium against the running platform: logging in, the
dashboard's charts drawn from real proxied calls, a key's secret shown once, calls arriving on the live page.
"""

from __future__ import annotations

import re
from typing import Any

import openai
from playwright.sync_api import Page, expect

from accounts.models import User
from tests.browser.conftest import WAIT_MS, ledger_rows, login, screenshot
from tests.live_server import LiveServer
from tests.proxy.helpers import key_make, model_make, upstream_make

MESSAGES: Any = [{"role": "user", "content": "hello from the browser test"}]

# Whether a chart shows any of its data (axes and grid lines alone do not count): a bar at least a pixel high, a
# line segment between two neighbouring points, or a point drawn as a dot.
CHART_SHOWS_DATA = """canvas => {
    const chart = Chart.getChart(canvas);
    if (!chart) return false;
    return chart.data.datasets.some((dataset, index) => {
        const meta = chart.getDatasetMeta(index);
        if (meta.hidden) return false;
        const shown = meta.data.filter(element => !element.skip && Number.isFinite(element.y));
        if (meta.type === "bar") return shown.some(element => Math.abs(element.base - element.y) >= 1);
        const dots = shown.some(element => element.options.pointStyle && element.options.radius > 0);
        const segment = meta.data.some((element, at) => at > 0 && !element.skip && !meta.data[at - 1].skip);
        return dots || segment;
    });
}"""


def _proxied_calls(site: LiveServer, upstream: Any, count: int) -> Any:
    model_make("gpt-browser", upstream_make(name="browser-upstream", base_url=upstream.base_url, max_retries=0))
    key = key_make(name="browser-key")
    client = openai.OpenAI(base_url=site.url("/v1"), api_key=key.secret, max_retries=0, timeout=10)
    for _ in range(count):
        assert client.chat.completions.create(model="gpt-browser", messages=MESSAGES).choices
    return key


def test_a_staff_member_logs_in_and_sees_the_dashboard_charts_drawn_from_real_calls(
    page: Page, site: LiveServer, fake_upstream: Any, staff_login: tuple[User, str]
) -> None:
    _proxied_calls(site, fake_upstream, 3)
    ledger_rows(3)

    login(page, *staff_login)

    expect(page).to_have_url(re.compile(r"/admin/$"))
    expect(page.locator("#card-requests")).to_contain_text("3")
    for chart in ("requests", "latency", "tokens-by-model", "cost-by-model"):
        canvas = page.locator(f"canvas#chart-{chart}")
        expect(canvas).to_be_visible()
        page.wait_for_function(f"({CHART_SHOWS_DATA})(document.querySelector('canvas#chart-{chart}'))", timeout=WAIT_MS)
    expect(page.get_by_text("browser-upstream").first).to_be_visible()
    screenshot(page, "dashboard")


def test_a_wrong_password_stays_on_the_login_page(page: Page, staff_login: tuple[User, str]) -> None:
    user, password = staff_login

    login(page, user, password + "-wrong")

    expect(page).to_have_url(re.compile(r"/admin/login/"))
    expect(page.locator("body")).to_contain_text("Please enter the correct username and password")


def test_a_new_keys_secret_is_shown_once(page: Page, site: LiveServer, staff_login: tuple[User, str]) -> None:
    user, _ = staff_login
    login(page, *staff_login)

    page.goto("/admin/keys/apikey/add/")
    # The owner is an autocomplete (select2 over AJAX): put the chosen user in as its script would.
    page.evaluate(
        """id => { const s = document.querySelector("select[name=owner]");
                   if (!s.querySelector(`option[value="${id}"]`)) s.add(new Option("operator", id, true, true));
                   s.value = String(id); }""",
        user.pk,
    )
    page.fill("input[name=name]", "made-in-the-browser")
    with page.expect_navigation(wait_until="domcontentloaded"):
        page.click("button[name=_save]")

    secret = page.locator("#api-key-secret").input_value()
    assert secret.startswith("afk-")
    screenshot(page, "key-issued")
    client = openai.OpenAI(base_url=site.url("/v1"), api_key=secret, max_retries=0, timeout=10)
    assert client.models.list().object == "list"  # the secret works

    page.goto("/admin/keys/apikey/")
    expect(page.locator("body")).to_contain_text("made-in-the-browser")
    page.get_by_role("link", name="made-in-the-browser").click()
    page.wait_for_load_state("domcontentloaded")
    assert secret not in page.content()  # never again
    screenshot(page, "key-page")


def test_calls_appear_on_the_live_page_as_they_are_served(
    page: Page, site: LiveServer, fake_upstream: Any, staff_login: tuple[User, str]
) -> None:
    login(page, *staff_login)
    page.goto("/admin/live/")
    expect(page.locator("#live-state")).to_have_attribute("data-state", "live")

    key = _proxied_calls(site, fake_upstream, 2)
    ledger_rows(2)  # the emitter's flush is what publishes the events

    rows = page.locator("#live-events tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("gpt-browser")
    expect(rows.first).to_contain_text("200")
    expect(rows.first).to_contain_text(key.owner.username)  # the user by name, not by id
    expect(page.locator("#live-empty")).to_be_hidden()
    screenshot(page, "live")


def test_a_tiny_cost_axis_reads_as_round_numbers(
    page: Page, site: LiveServer, fake_upstream: Any, staff_login: tuple[User, str]
) -> None:
    upstream = upstream_make(name="cheap-upstream", base_url=fake_upstream.base_url, max_retries=0)
    model_make("gpt-cheap", upstream, input_price="0.0007", output_price="0.0008")
    key = key_make(name="cheap-key")
    client = openai.OpenAI(base_url=site.url("/v1"), api_key=key.secret, max_retries=0, timeout=10)
    for _ in range(3):
        assert client.chat.completions.create(model="gpt-cheap", messages=MESSAGES).choices
    ledger_rows(3)
    login(page, *staff_login)

    page.goto(f"/admin/keys/apikey/{key.pk}/change/")
    # Every y tick of the cost chart short (e.g. 0.000005, not 0.0000049999999999999996), within the wait.
    page.wait_for_function(
        """() => { if (typeof Chart === "undefined") return false;
                   const chart = Chart.getChart(document.querySelector("canvas#chart-key-cost"));
                   if (!chart) return false;
                   const labels = chart.scales.y.ticks.map(tick => String(tick.label));
                   return labels.length > 2 && labels.every(label => label.length <= 10); }"""
    )
    screenshot(page, "key-page-usage")
