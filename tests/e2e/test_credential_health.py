"""A login's health the way a person meets it, with real everything: an ``airlock serve
--demo`` process (its demo IdP, its scheduled check), a real CLI VM and browser VMs
(sandbox), the live view in Debian's Chromium driven by Playwright.

On the dashboard the person creates a CLI VM and clicks "Log in" in its row for OAuth 2.0,
signs in through the live view; the row shows the login active. The IdP then revokes that
login (as a vendor's "sign out everywhere" does; the test uses the demo IdP's admin route):
within one check period the API, the dashboard's row and the metrics say ``revoked``. The
person clicks "Log in again" in the row and signs in: the new login replaces the old one in
the same VM, and the IdP never saw a refresh token used twice. "Move here" in a second CLI
VM's row moves the login there.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest
from playwright.async_api import Frame, Locator, Page, async_playwright, expect

from airlock.api import static
from airlock.providers.oauth2 import TOKENS_PATH, demo_idp_issuer
from tests.e2e.conftest import ARTIFACTS, Server
from tests.e2e.test_login import wait_session
from tests.e2e.test_viewer import (
    CARD,
    PAGE,
    click_beside_the_form,
    dashboard,
    sign_in,
    wait_pixels,
)
from tests.idp_live import LiveIdp, grant_of

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not static.novnc_installed(), reason="noVNC is not installed: run scripts/setup.sh"
    ),
]

ADMIN = "e2e-idp-admin-7b3d"
PERIOD_MS = 3000


async def live_view(page: Page, button: Locator) -> tuple[Frame, Locator, Locator]:
    await button.click()
    frame_element = await page.wait_for_selector("#viewer-frame[src]")
    viewer = await frame_element.content_frame()
    assert viewer is not None
    await viewer.wait_for_load_state()
    return viewer, viewer.locator("#status"), viewer.locator("#screen canvas")


async def log_in_through(page: Page, button: Locator, api: httpx.AsyncClient) -> dict[str, Any]:
    """Click ``button``, sign in as the demo user in the live view; the completed session."""
    viewer, status, canvas = await live_view(page, button)
    await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)
    # The form laid out over the whole (resized) screen: the window was fitted and focused.
    await wait_pixels(canvas, {"centre": CARD, "corner": PAGE, "origin": PAGE})
    await click_beside_the_form(page, canvas)
    await expect(viewer.locator("#screen")).to_have_class(re.compile("focused"))
    await sign_in(page, "demo", "demo")
    try:
        await expect(status).to_have_text("Connected ✓", timeout=60_000)
    except AssertionError:
        await page.screenshot(path=str(ARTIFACTS / "health-login-failed.png"))
        raise
    sessions = (await api.get("/api/auth/sessions")).json()
    return await wait_session(api, sessions[0]["sessionId"], "completed")


async def logins_until(
    api: httpx.AsyncClient, ok: Any, timeout: float = 60
) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    while True:
        logins = (await api.get("/api/credentials")).json()
        if ok(logins):
            return logins, time.monotonic() - started
        assert time.monotonic() - started < timeout, logins
        await asyncio.sleep(0.1)


def gauge(metrics: str, state: str) -> float:
    match = re.search(
        rf'^airlock_credentials{{provider="oauth2",state="{state}"}} (\S+)$', metrics, re.M
    )
    assert match, metrics[-2000:]
    return float(match.group(1))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_revoked_login_shows_revoked_and_log_in_again_replaces_it(
    server_factory: Any,
) -> None:
    server: Server = server_factory(
        grace_success_ms=30_000, credential_check_ms=PERIOD_MS, demo_idp_admin_token=ADMIN
    )
    server.start()
    port = int(server.env["AIRLOCK_DEMO_IDP_PORT"])
    idp = LiveIdp(port, demo_idp_issuer(port), ADMIN)
    user_token = server.cli("tokens", "create", "--user", "alice")
    ARTIFACTS.mkdir(exist_ok=True)
    headers = {"Authorization": f"Bearer {user_token}"}
    async with (
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as api,
        async_playwright() as pw,
    ):
        browser, page = await dashboard(pw, server, user_token)
        try:
            await page.get_by_role("button", name="New CLI VM").click()
            row = page.locator("#vms tr").first
            await expect(row).to_contain_text("running", timeout=90_000)
            vm_id = await row.get_attribute("data-vm-id")
            assert vm_id
            await expect(row).to_contain_text("OAuth 2.0 not logged in")

            await log_in_through(page, row.get_by_role("button", name="Log in: OAuth 2.0"), api)
            [first], _ = await logins_until(
                api, lambda ls: len(ls) == 1 and ls[0]["holderVmId"] == vm_id
            )
            assert first["state"] == "active" and first["provider"] == "oauth2"
            await expect(row.locator('[data-provider="oauth2"] .state-active')).to_be_visible()
            await page.screenshot(path=str(ARTIFACTS / "health-1-active.png"), full_page=True)

            # The IdP revokes the login (its only grant so far).
            [grant] = idp.grants()
            idp.revoke(grant)
            [revoked], took = await logins_until(
                api, lambda ls: ls and ls[0]["state"] == "revoked", timeout=PERIOD_MS / 1000 + 30
            )
            print(f"\nrevoked seen in the API {took:.2f} s after the IdP revoked it")
            assert revoked["grantId"] == first["grantId"] and revoked["lastCheckedAt"]
            assert took <= PERIOD_MS / 1000 + 20  # one period, and one check's run in the VM
            await expect(row.locator('[data-provider="oauth2"] .state-revoked')).to_be_visible()
            await expect(page.locator("#logins tr").first).to_contain_text("revoked")
            metrics = (await api.get("/metrics")).text
            assert gauge(metrics, "revoked") == 1 and gauge(metrics, "active") == 0
            await page.screenshot(path=str(ARTIFACTS / "health-2-revoked.png"), full_page=True)

            # Log in again, from the VM's row: the new login replaces the old, in that VM.
            again = row.get_by_role("button", name="Log in again: OAuth 2.0")
            session = await log_in_through(page, again, api)
            [renewed], _ = await logins_until(  # captured, then placed where the old one was
                api,
                lambda ls: (
                    len(ls) == 1
                    and ls[0]["grantId"] != first["grantId"]
                    and ls[0]["holderVmId"] == vm_id
                ),
            )
            assert renewed["holderVmId"] == vm_id and renewed["state"] == "active"
            assert renewed["sessionId"] == session["sessionId"]
            await expect(row.locator('[data-provider="oauth2"] .state-active')).to_be_visible()
            await expect(page.locator("#logins tr")).to_have_count(1)
            tokens = (server.data_dir / "vms" / vm_id / "home" / TOKENS_PATH).read_bytes()
            seen = idp.grants()
            assert grant_of(tokens) in seen and grant_of(tokens) != grant
            assert seen[grant_of(tokens)]["revoked"] is False
            assert idp.totals()["reusedRefreshTokens"] == 0
            metrics = (await api.get("/metrics")).text
            assert gauge(metrics, "revoked") == 0 and gauge(metrics, "active") == 1
            await page.screenshot(
                path=str(ARTIFACTS / "health-3-logged-in-again.png"), full_page=True
            )

            # Move here, from a second CLI VM's row: the login leaves the first VM for it.
            await page.get_by_role("button", name="New CLI VM").click()
            second = page.locator(f'#vms tr:not([data-vm-id="{vm_id}"])').first
            await expect(second).to_contain_text("running", timeout=90_000)
            second_id = await second.get_attribute("data-vm-id")
            await expect(second).to_contain_text(f"in {vm_id}")
            await second.get_by_role("button", name="Move here: OAuth 2.0").click()
            [moved], _ = await logins_until(
                api, lambda ls: len(ls) == 1 and ls[0]["holderVmId"] == second_id
            )
            assert moved["grantId"] == renewed["grantId"]
            await expect(second.locator('[data-provider="oauth2"] .state-active')).to_be_visible()
            first_row = page.locator(f'#vms tr[data-vm-id="{vm_id}"]')  # no longer the top
            await expect(first_row).to_contain_text(f"in {second_id}")
            assert not (server.data_dir / "vms" / vm_id / "home" / TOKENS_PATH).exists()
            assert idp.totals()["reusedRefreshTokens"] == 0
        finally:
            await browser.close()
