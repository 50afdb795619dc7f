"""The viewer page's status bar in a real browser (Debian's Chromium via Playwright), fed
by the real events route of an in-process controller on a loopback port: the words for
each outcome, the countdown, the keepalive when the tab becomes visible, and the
``complete`` call after success. No VM runs (``NoVmRuntime``: the screen stays empty);
the whole flow with a VM is tests/e2e/test_viewer.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from airlock.api import static
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from tests.api.conftest import Api
from tests.api.live import serve
from tests.api.test_routes import _move_vm
from tests.api.test_viewer_page import mint
from tests.e2e.test_viewer import CHROMIUM, CHROMIUM_ARGS
from tests.lifecycle_helpers import wait_for

pytestmark = pytest.mark.skipif(
    not static.novnc_installed(), reason="noVNC is not installed: run scripts/setup.sh"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def set_outcome(api: Api, session_id: str, status: SessionStatus, reason: str) -> None:
    async with api.core.db.transaction() as repo:
        row = await repo.auth_session(session_id)
        assert row is not None
        row.status, row.failure_reason = status.value, reason or None


async def open_viewer(browser: Browser, url: str, api: Api, session_id: str, vm_id: str) -> Page:
    page = await browser.new_page()
    await page.goto(
        f"{url}/api/auth/session/{session_id}/novnc?token={mint(api, session_id, vm_id)}"
    )
    return page


# The page does not care which database the controller uses.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_status_bar_says_what_happened(api: Api, browser: Browser) -> None:
    async with serve(api.app, lifespan=False) as url:
        # Waiting for the person; a keepalive when the tab becomes visible; then the VM is
        # lost under the open page.
        session, vm = await api.add_session("alice", destroy_after=timedelta(seconds=30))
        page = await open_viewer(browser, url, api, session.id, vm.id)
        status = page.locator("#status")
        await expect(status).to_have_text("Sign in with oauth2")
        before = vm.destroy_after
        assert before is not None
        await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")

        async def extended() -> bool:
            async with api.core.db.transaction() as repo:
                fresh = await repo.vm(vm.id)
            assert fresh is not None and fresh.destroy_after is not None
            return fresh.destroy_after > before + timedelta(seconds=30)

        await wait_for(extended, timeout=5, interval=0.1, what="a keepalive extends the deadline")
        await _move_vm(api, vm.id, VmState.RUNNING, VmState.LOST, publish=session.id)
        await expect(status).to_have_text(re.compile(r"^The browser VM was lost"))
        await page.close()

        # Each outcome in words, with the reason.
        for outcome, reason, words in (
            (SessionStatus.FAILED, "vm_boot_failed", "The login failed: vm_boot_failed"),
            (SessionStatus.EXPIRED, "login_timeout", "The login timed out: login_timeout"),
            (SessionStatus.CANCELLED, "", "The login was cancelled"),
        ):
            session, vm = await api.add_session("alice", vm_state=VmState.DRAINING)
            await set_outcome(api, session.id, outcome, reason)
            page = await open_viewer(browser, url, api, session.id, vm.id)
            await expect(page.locator("#status")).to_have_text(words)
            assert await page.locator("#statusbar").get_attribute("data-tone") == "bad"
            await page.close()
        assert api.runtime.destroyed == []  # only success calls complete

        # Success: the countdown to the VM's end, then complete, then done.
        session, vm = await api.add_session(
            "alice", vm_state=VmState.DRAINING, destroy_after=timedelta(seconds=25)
        )
        await set_outcome(api, session.id, SessionStatus.COMPLETED, "")
        page = await open_viewer(browser, url, api, session.id, vm.id)
        await expect(page.locator("#status")).to_have_text("Connected ✓")
        countdown = page.locator("#countdown")
        await expect(countdown).to_have_text(re.compile(r"^\(closing in 2[0-5] s\)$"))
        await expect(countdown).to_have_text("(done: you can close this tab)", timeout=10_000)
        assert api.runtime.destroyed == [vm.id]
        await page.close()
