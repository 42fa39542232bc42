"""Browser tests: the admin under the real ASGI application, driven by headless Chromium through Playwright.

The browser is Debian's ``chromium`` package (``.ci/run`` installs it when missing; Playwright never downloads
one); without it, or without Playwright, these tests are skipped with the reason. The server is
``apiforge.asgi:application`` under uvicorn in this process (``tests/live_server.py``), with the static files
served the way Django's live-server tests serve them (``ASGIStaticFilesHandler``, as ``DEBUG`` is off in tests).
Screenshots go to ``artifacts/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from accounts.models import User
from gateway_stats.models import UsageRecord
from tests.factories import UserFactory
from tests.live_server import LiveServer, live_server_factory
from tests.proxy.conftest import fake_upstream
from tests.proxy.helpers import usage_flush

__all__ = ["fake_upstream", "live_server_factory"]  # fixtures of this folder's tests too

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(settings.BASE_DIR) / "artifacts" / "screenshots"
WAIT_MS = 15_000

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - playwright is in requirements/dev.txt
    sync_playwright = None


@pytest.fixture(autouse=True)
def _orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Playwright's sync API keeps an event loop running in this thread, which Django takes for async code and
    refuses the ORM in (pytest-django's advice for Playwright). The test's own ORM calls are plain sync code."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:  # pragma: no cover
        pytest.skip("Playwright is not installed")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):  # pragma: no cover - CI installs it
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            browser.close()


def _with_static_files(application: Any) -> Any:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
    from django.core.asgi import get_asgi_application

    static = ASGIStaticFilesHandler(get_asgi_application())

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(settings.STATIC_URL):
            await static(scope, receive, send)
        else:
            await application(scope, receive, send)

    return app


@pytest.fixture
def site(transactional_db: None, live_server_factory: Callable[..., LiveServer], settings: Any) -> LiveServer:
    """The whole platform on a free port: admin, proxy, gateway, WebSocket, static files. The usage ledger is
    written straight to the database (``ledger_rows`` flushes it), as in the embedded default: no Celery worker
    runs beside the suite."""
    from apiforge.asgi import application

    settings.USAGE_TRANSPORT = "database"
    return live_server_factory(_with_static_files(application), timeout_graceful_shutdown=20)


@pytest.fixture
def staff_login() -> tuple[User, str]:
    """A superuser with a strong password of its own (the secret-leak check tracks it)."""
    password = secrets.token_urlsafe(18)
    user = UserFactory(username="operator", superuser=True)
    user.set_password(password)
    user.save()
    return user, password


@pytest.fixture
def page(browser: Browser, site: LiveServer, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=site.base_url)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    missing: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "request",
        lambda r: (
            None if r.url.startswith((site.base_url, "ws://127.0.0.1", "data:", "blob:")) else foreign.append(r.url)
        ),
    )
    page.on(
        "response", lambda r: missing.append(f"{r.status} {r.url}") if r.status >= 400 and "/static/" in r.url else None
    )
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not missing, f"static files not served: {missing}"
    assert not foreign, f"requests outside the platform (a CDN?): {foreign}"


def login(page: Page, user: User, password: str) -> None:
    page.goto("/admin/login/")
    page.fill("input[name=username]", user.username)
    page.fill("input[name=password]", password)
    with page.expect_navigation(wait_until="domcontentloaded"):
        page.click("button[type=submit]")


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def ledger_rows(count: int, timeout_s: float = 10.0) -> None:
    """Flush the usage emitter until the ledger holds ``count`` rows (bounded)."""
    deadline = time.monotonic() + timeout_s
    while UsageRecord.objects.count() < count:
        usage_flush()
        assert time.monotonic() < deadline, f"the ledger has {UsageRecord.objects.count()} rows, not {count}"
        time.sleep(0.05)
