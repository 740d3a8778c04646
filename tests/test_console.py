"""The local console (local/console.py) against a running stack: in a real browser, and without JS.

The browser is Debian's chromium (``local/install_browser.sh``) driven by Playwright from pip; the
path is ``$PUSHLINE_CHROMIUM``, else ``chromium`` on PATH, else ``/usr/bin/chromium``. Without
Playwright or Chromium the browser test skips, except under CI=true where it fails.
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, clean, require, start_stack

pytestmark = pytest.mark.e2e

ARTIFACT = ROOT / "artifacts" / "console.png"
DOCS_SCREENSHOT = ROOT / "docs" / "console.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def chromium_path() -> str:
    return os.environ.get("PUSHLINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def stack(servers):
    clean(servers)
    started = start_stack(
        use_emulator=False, console=True, redis_url=servers.redis_url, database_url=servers.database_url
    )
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Playwright is not installed (pip install playwright)")
    path = chromium_path()
    require(Path(path).is_file(), f"no Chromium at {path} (run local/install_browser.sh)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_console_in_a_browser(browser, stack) -> None:
    from playwright.sync_api import expect

    user = f"console-{uuid.uuid4().hex[:8]}"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(stack.url("console") + "/")
    page.keyboard.press("Tab")
    expect(page.locator(":focus")).to_have_text("Skip to content")

    # A test user, made with the keyboard.
    page.get_by_label("User id", exact=True).fill(user)
    page.get_by_label("User id", exact=True).press("Enter")
    expect(page.get_by_role("status")).to_contain_text(f"Created user {user}")

    # Two simulated devices, through the real register endpoint.
    for behaviour, platform in (("healthy", "android"), ("uninstalled", "ios")):
        expect(page.locator("#device-user")).to_have_value(user)  # the user just made is chosen
        page.get_by_label("Behaviour").select_option(behaviour)
        page.get_by_label("Platform", exact=True).select_option(platform)
        page.get_by_role("button", name="Register device").click()
        expect(page.get_by_role("status")).to_contain_text(f"({behaviour}, {platform}) for {user}")

    healthy = page.locator(f'article.device[data-user="{user}"][data-behaviour="healthy"]')
    dead = page.locator(f'article.device[data-user="{user}"][data-behaviour="uninstalled"]')
    expect(healthy).to_contain_text("Live")
    expect(dead).to_contain_text("Live")

    # Compose and send to that user (checked by default: the user just made).
    page.get_by_role("textbox", name="Title").fill("Hello from the console")
    page.get_by_role("textbox", name="Body").fill("Two devices, one uninstalled")
    page.get_by_role("textbox", name="Data").fill("screen=inbox")
    expect(page.get_by_role("checkbox", name=user)).to_be_checked()
    page.get_by_role("button", name="Send").click()

    # The status region follows the notification (polling) until it is done.
    status = page.locator("#status-region")
    expect(status).to_have_attribute("aria-live", "polite")
    expect(status).to_contain_text("done", timeout=TIMEOUT_MS)
    expect(status.locator('[data-count="delivered"]')).to_have_text("1 delivered")
    expect(status.locator('[data-count="dead_removed"]')).to_have_text("1 dead removed")

    # The devices: the healthy one received it; the uninstalled one is removed, and why.
    expect(healthy.locator(".received")).to_contain_text("Hello from the console", timeout=TIMEOUT_MS)
    expect(healthy.locator(".received")).to_contain_text("screen=inbox")
    expect(dead).to_contain_text("Removed", timeout=TIMEOUT_MS)
    expect(dead).to_contain_text("UNREGISTERED")

    # The healthy device opens the notification: an open receipt, counted once.
    healthy.locator(".received").get_by_role("button", name="Open").first.click()
    expect(page.get_by_role("status")).to_contain_text("opened")
    expect(page.get_by_role("status")).to_contain_text(": counted.")
    expect(status.locator('[data-receipt="opened"]')).to_have_text("1 opened")
    healthy.locator(".received").get_by_role("button", name="Open").first.click()
    expect(page.get_by_role("status")).to_contain_text("already counted for this device")
    expect(status.locator('[data-receipt="opened"]')).to_have_text("1 opened")

    # The stores: the healthy token in both, the dead one in neither.
    healthy_token = healthy.get_attribute("data-token")
    dead_token = dead.get_attribute("data-token")
    page.locator("#s-user").fill(user)
    page.locator("#s-user").press("Enter")
    table = page.locator("#stores-table")
    expect(table.get_by_role("row", name=healthy_token)).to_contain_text("yes")
    expect(table).not_to_contain_text(dead_token)

    ARTIFACT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACT), full_page=True)
    if not DOCS_SCREENSHOT.exists() or os.environ.get("PUSHLINE_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACT, DOCS_SCREENSHOT)
    page.close()


def test_console_forms_work_without_javascript(stack) -> None:
    """POST then redirect; errors shown on the page; nothing loaded from another host; local only."""
    console = stack.url("console")
    http = requests.Session()
    user = f"nojs-{uuid.uuid4().hex[:8]}"
    made = http.post(f"{console}/users", data={"user": user}, allow_redirects=False, timeout=30)
    assert made.status_code == 303 and made.headers["Location"].endswith("#users")
    added = http.post(
        f"{console}/devices",
        data={"user": user, "behaviour": "flaky", "platform": "web"},
        allow_redirects=False,
        timeout=30,
    )
    assert added.status_code == 303 and "err=" not in added.headers["Location"], added.headers["Location"]
    refused = http.post(
        f"{console}/send", data={"title": "x", "data": "not a pair", "users": user}, allow_redirects=False, timeout=30
    )
    assert refused.status_code == 400 and "data line 1 is not key=value" in refused.text
    assert 'value="x"' in refused.text  # the form keeps what was typed
    for send_at, reason in (("tomorrow", "is not a date and time"), ("2020-01-01T09:00", "send_at")):
        late = http.post(f"{console}/send", data={"title": "x", "users": user, "send_at": send_at}, timeout=30)
        assert late.status_code == 400 and reason in late.text, late.text
        assert f'value="{send_at}"' in late.text

    page = http.get(f"{console}/?user={user}", timeout=30).text
    assert '<meta name="viewport"' in page and 'aria-live="polite"' in page
    assert f'data-user="{user}" data-behaviour="flaky"' in page
    assert "http://" not in page and "https://" not in page  # offline: no CDN, no external fonts

    foreign = http.post(f"{console}/users", data={"user": "x"}, headers={"Origin": "https://evil.example"}, timeout=30)
    assert foreign.status_code == 403


def test_console_shows_and_edits_a_users_preferences(stack) -> None:
    """Through the real register endpoint: saved, shown, refused with register's own message, and a
    send with the muted category skips the user."""
    from local.idtoken import emulator_id_token

    console = stack.url("console")
    http = requests.Session()
    user = f"prefs-{uuid.uuid4().hex[:8]}"
    http.post(f"{console}/users", data={"user": user}, allow_redirects=False, timeout=30)
    http.post(f"{console}/devices", data={"user": user, "behaviour": "healthy", "platform": "android"}, timeout=30)
    form = {"user": user, "muted": "marketing, news", "quiet_start": "22:00", "quiet_end": "07:00"}
    saved = http.post(
        f"{console}/preferences", data={**form, "time_zone": "Europe/Berlin"}, allow_redirects=False, timeout=30
    )
    assert saved.status_code == 303 and "err=" not in saved.headers["Location"], saved.headers["Location"]
    headers = {"Authorization": f"Bearer {emulator_id_token(user, stack.config.project)}"}
    stored = http.get(stack.url("register") + "/preferences", headers=headers, timeout=30).json()
    assert stored == {
        "muted_categories": ["marketing", "news"],
        "quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"},
    }
    page = http.get(f"{console}/?user={user}", timeout=30).text
    assert f'data-preferences="{user}"' in page and "<code>marketing, news</code>" in page
    assert 'value="Europe/Berlin"' in page and 'value="22:00"' in page

    refused = http.post(f"{console}/preferences", data={**form, "time_zone": "Mars/Olympus"}, timeout=30)
    assert "quiet_hours.time_zone" in refused.text  # register's 400, shown on the page
    assert http.get(stack.url("register") + "/preferences", headers=headers, timeout=30).json() == stored

    sent = http.post(
        f"{console}/send",
        data={"title": "Sale", "users": user, "category": "marketing", "current": user},
        allow_redirects=False,
        timeout=30,
    )
    assert sent.status_code == 303, sent.text
    nid = sent.headers["Location"].split("n=")[1].split("&")[0].split("#")[0]

    def muted() -> bool:
        status = http.get(f"{stack.url('send')}/{nid}", timeout=30).json()
        return status["state"] == "done" and status["users"]["muted"] == 1

    from local.servers import wait_until

    wait_until(muted, timeout=60, interval=0.2, what="the console's send to be done, the user muted")


def test_console_cancels_through_send(stack) -> None:
    """The status shows a cancel button while the notification can be cancelled; it goes through
    send's DELETE /<id> and the page then shows the notification cancelled (or send's refusal)."""
    import redis

    from shared.claims import Claims

    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    claims = Claims(client, ledger_ttl=600, once_ttl=600, idempotency_ttl=600, max_attempts=3, rate_per_minute=0)
    nid = f"console-{uuid.uuid4().hex[:8]}"
    claims.create_status(nid, targeted=1)  # accepted: no deliver has read it yet
    client.close()
    console = stack.url("console")
    http = requests.Session()
    assert 'action="/cancel"' in http.get(f"{console}/?n={nid}", timeout=30).text
    cancelled = http.post(f"{console}/cancel", data={"n": nid}, allow_redirects=False, timeout=30)
    assert cancelled.status_code == 303 and "msg=" in cancelled.headers["Location"], cancelled.headers["Location"]
    page = http.get(console + cancelled.headers["Location"], timeout=30).text
    assert 'data-state="cancelled" data-settled' in page and f"Cancelled notification {nid}." in page
    assert 'action="/cancel"' not in page  # nothing left to cancel
    missing = http.post(f"{console}/cancel", data={"n": "no-such-notification"}, allow_redirects=False, timeout=30)
    assert missing.status_code == 303 and "err=" in missing.headers["Location"]
    assert "send refused the cancel (404)" in http.get(console + missing.headers["Location"], timeout=30).text


def test_console_schedules_a_send_and_lists_it_until_cancelled(browser, stack) -> None:
    """Compose with a send-at an hour ahead (UTC): the scheduled list (what the CLI's ``scheduled``
    reads) shows it with its due time and a link to its status; its Cancel goes through send."""
    from playwright.sync_api import expect

    user = f"sched-{uuid.uuid4().hex[:8]}"
    due = (datetime.now(UTC) + timedelta(hours=1)).replace(second=0, microsecond=0)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(stack.url("console") + "/")
    page.get_by_label("User id", exact=True).fill(user)
    page.get_by_label("User id", exact=True).press("Enter")
    expect(page.get_by_role("status")).to_contain_text(f"Created user {user}")

    page.get_by_role("textbox", name="Title").fill("Later")
    page.get_by_label("Send at (UTC)").fill(due.strftime("%Y-%m-%dT%H:%M"))
    expect(page.get_by_role("checkbox", name=user)).to_be_checked()
    page.get_by_role("button", name="Send", exact=True).click()
    status = page.locator("#status-region")
    expect(status.locator(".status-state")).to_have_text("scheduled")
    nid = status.locator("code").first.inner_text()

    # deliver records it in PostgreSQL; the list follows (polling) and shows its due time
    row = page.locator(f'#scheduled-list tr[data-notification="{nid}"]')
    expect(row).to_contain_text(due.strftime("%Y-%m-%d %H:%M:%S UTC"))
    expect(row.get_by_role("link", name=nid)).to_have_attribute("href", f"/?n={nid}#status")
    row.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("status")).to_contain_text(f"Cancelled notification {nid}.")
    expect(status.locator(".status-state")).to_have_text("cancelled")
    # the row stays until the tick that finds it due finishes it: shown cancelled, no second cancel
    expect(row).to_contain_text("cancelled")
    expect(row.get_by_role("button", name="Cancel")).to_have_count(0)
    page.close()
