"""The admin Playground in headless Chromium against the running platform: the page's script gets a playground
token, streams the proxy's answer, shows the tokens and the cost the ledger recorded, and the proxy's errors."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from playwright.sync_api import Page, expect

from accounts.models import User
from gateway_stats.models import AuditEvent, UsageRecord
from tests.browser.conftest import ledger_rows, login, screenshot
from tests.live_server import LiveServer
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make

MESSAGE = "hello from the playground page"


def test_a_message_sent_from_the_playground_streams_the_answer_with_its_tokens_and_cost(
    page: Page, site: LiveServer, fake_upstream: Any, staff_login: tuple[User, str]
) -> None:
    upstream = upstream_make(name="pg-browser", base_url=fake_upstream.base_url, max_retries=0)
    model_make("gpt-pg-a", upstream, input_price="0.5", output_price="1.5")
    model_make("gpt-pg-b", upstream)
    key = key_make(name="pg-all")
    scoped = key_make(name="pg-scoped", allowed_models=["gpt-pg-b"])
    login(page, *staff_login)

    page.goto("/admin/playground/")
    page.select_option("#playground-key", str(scoped.pk))
    expect(page.locator("#playground-model option")).to_have_count(1)
    page.select_option("#playground-key", str(key.pk))
    expect(page.locator("#playground-model option")).to_have_count(2)
    page.select_option("#playground-model", "gpt-pg-a")
    page.fill("#playground-message", MESSAGE)
    page.click("#playground-send")

    expected = FakeUpstream.expected_content([{"role": "user", "content": MESSAGE}])
    expect(page.locator("#playground-answer")).to_have_text(expected)
    usage = FakeUpstream.expected_usage([{"role": "user", "content": MESSAGE}])
    expect(page.locator("[data-usage=total_tokens]")).to_have_text(str(usage["total_tokens"]))
    ledger_rows(1)
    row = UsageRecord.objects.get()
    assert row.key_id == key.pk
    expect(page.locator("[data-usage=cost]")).to_have_text(format(row.cost.normalize(), "f"))
    assert row.cost > Decimal(0)
    expect(page.locator("#playground-error")).to_be_hidden()
    assert AuditEvent.objects.filter(action="key.playground", object_id=str(key.pk)).count() == 1
    screenshot(page, "playground")


def test_the_proxys_refusal_is_shown_in_the_error_area(
    page: Page, site: LiveServer, fake_upstream: Any, staff_login: tuple[User, str]
) -> None:
    model_make("gpt-pg", upstream_make(name="pg-refused", base_url=fake_upstream.base_url, max_retries=0))
    key_make(name="pg-limited", rpm_limit=1)
    login(page, *staff_login)
    page.goto("/admin/playground/")
    page.fill("#playground-message", "one")
    page.click("#playground-send")
    expect(page.locator("#playground-answer")).not_to_be_empty()

    page.fill("#playground-message", "two")
    page.click("#playground-send")

    error = page.locator("#playground-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("429")
    expect(error).to_contain_text("Rate limit")
    expect(page.locator("#playground-answer")).to_be_empty()
    screenshot(page, "playground-refused")
