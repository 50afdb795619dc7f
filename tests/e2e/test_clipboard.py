"""The clipboard of the live view, as a person uses it: Ctrl+V pastes their clipboard into
the focused field in the VM; where the browser will not let the page read the clipboard,
the Paste control takes the text; text copied in the VM lands in their clipboard, unless
the operator turned copy-out off. Real server, sandbox, noVNC, Chromium on both ends;
the demo IdP's sign-in is the verdict on what arrived."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from airlock.api import static
from tests.e2e.conftest import ARTIFACTS, Server
from tests.e2e.test_login import wait_session
from tests.e2e.test_viewer import (
    CARD,
    PAGE,
    PASSWORD,
    click_beside_the_form,
    dashboard,
    open_login,
    shot,
    wait_pixels,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not static.novnc_installed(), reason="noVNC is not installed: run scripts/setup.sh"
    ),
    pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
]
CLIPBOARD = ("clipboard-read", "clipboard-write")


async def local_clipboard(page: Page) -> str:
    return str(await page.evaluate("navigator.clipboard.readText()"))


async def started(server_factory: Any, **settings: Any) -> tuple[Server, str]:
    server: Server = server_factory(grace_success_ms=30_000, demo_password=PASSWORD, **settings)
    server.start()
    ARTIFACTS.mkdir(exist_ok=True)
    return server, server.cli("tokens", "create", "--user", "alice")


async def completed(server: Server, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as api:
        sessions = (await api.get("/api/auth/sessions")).json()
        done = await wait_session(api, sessions[0]["sessionId"], "completed")
        assert done["credentials"]["captured"] is True


async def test_ctrl_v_pastes_the_local_clipboard_into_the_remote_field(
    server_factory: Any,
) -> None:
    server, token = await started(server_factory)
    async with async_playwright() as pw:
        browser, page = await dashboard(pw, server, token, CLIPBOARD)
        try:
            # The password is on the person's clipboard (from their password manager).
            await page.evaluate("(t) => navigator.clipboard.writeText(t)", PASSWORD)
            _, status, canvas = await open_login(page)
            await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)
            await wait_pixels(canvas, {"centre": CARD, "corner": PAGE})
            await click_beside_the_form(page, canvas)
            await page.keyboard.type("demo", delay=25)
            await page.keyboard.press("Tab")
            await page.keyboard.press("Control+v")
            await shot(page, "paste-ctrl-v")
            await page.keyboard.press("Enter")
            await expect(status).to_have_text("Connected ✓", timeout=30_000)
            await completed(server, token)
        finally:
            await browser.close()


async def test_the_paste_control_works_where_the_clipboard_is_refused(
    server_factory: Any,
) -> None:
    server, token = await started(server_factory)
    async with async_playwright() as pw:
        browser, page = await dashboard(pw, server, token)  # no clipboard permission
        try:
            viewer, status, canvas = await open_login(page)
            await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)
            await wait_pixels(canvas, {"centre": CARD, "corner": PAGE})
            await click_beside_the_form(page, canvas)
            await page.keyboard.type("demo", delay=25)
            await page.keyboard.press("Tab")
            await viewer.get_by_role("button", name="Paste").click()
            box = viewer.locator("#paste-text")
            await expect(box).to_be_visible()  # readText was refused: the box instead
            await box.focus()
            await page.keyboard.insert_text(PASSWORD)  # what a paste into the box does
            await shot(page, "paste-control")
            await viewer.get_by_role("button", name="Send").click()
            await expect(box).to_be_hidden()
            await page.keyboard.press("Enter")  # the view has the keyboard again
            await expect(status).to_have_text("Connected ✓", timeout=30_000)
            await completed(server, token)
        finally:
            await browser.close()


@pytest.mark.parametrize("copy_out", [True, False])
async def test_text_copied_in_the_vm_reaches_the_local_clipboard(
    server_factory: Any, copy_out: bool
) -> None:
    server, token = await started(server_factory, viewer_copy_out=str(copy_out).lower())
    async with async_playwright() as pw:
        browser, page = await dashboard(pw, server, token, CLIPBOARD)
        try:
            await page.evaluate("navigator.clipboard.writeText('before')")
            viewer, status, canvas = await open_login(page)
            await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)
            await wait_pixels(canvas, {"centre": CARD, "corner": PAGE})
            await click_beside_the_form(page, canvas)
            # In the VM: type a code into the user name field, select it, copy it.
            await page.keyboard.type("code-4711 ÄÖ €", delay=25)
            await page.keyboard.press("Control+a")
            await page.keyboard.press("Control+c")
            deadline = time.monotonic() + (20 if copy_out else 5)
            while await local_clipboard(page) != "code-4711 ÄÖ €":
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            if copy_out:
                assert await local_clipboard(page) == "code-4711 ÄÖ €"
            else:  # the proxy dropped it: nothing changed here, and no box offers it
                assert await local_clipboard(page) == "before"
                await expect(viewer.locator("#copy-box")).to_be_hidden()
            await shot(page, f"copy-out-{'on' if copy_out else 'off'}")
            # The stream through the filter (copy-out off) still carries the login, and a
            # paste of text beyond Latin-1 (€: the extended clipboard, UTF-8) goes in.
            await page.keyboard.press("Control+a")
            await page.keyboard.type("demo", delay=25)
            await page.keyboard.press("Tab")
            await page.evaluate("(t) => navigator.clipboard.writeText(t)", PASSWORD)
            await page.keyboard.press("Control+v")
            await page.keyboard.press("Enter")
            await expect(status).to_have_text(re.compile("Connected"), timeout=30_000)
            await completed(server, token)
        finally:
            await browser.close()
