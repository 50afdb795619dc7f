"""What a person does, through the pages only: open the dashboard, sign in, click "Log in
oauth2", see the identity provider's form in the noVNC canvas, click its user name field,
type name and password as keystrokes through VNC, and watch the page say "Connected ✓";
the page then calls ``complete`` and the browser VM goes.

Real everything: an ``airlock serve --demo`` process, a sandbox with Xvnc and Chromium, the
controller's VNC proxy, noVNC from node_modules, Debian's Chromium driven by Playwright.
The VM's own Chromium is only *read* over DevTools (its screenshot, where the fields are,
which one has the focus) to prove that the canvas shows that page and that our clicks
landed. Screenshots of each step go to test-artifacts/viewer-*.png.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any

import httpx
import pytest
from playwright.async_api import Locator, Page, async_playwright, expect

from airlock.api import static
from tests.e2e.conftest import ARTIFACTS, Server, devtools_port
from tests.e2e.test_login import login_page, wait_session

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not static.novnc_installed(), reason="noVNC is not installed: run scripts/setup.sh"
    ),
]

CHROMIUM = "/usr/lib/chromium/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# How far the canvas is from a PNG of the VM's screen: the mean absolute difference per
# colour channel (0-255) over the area both cover, and the canvas's framebuffer size.
COMPARE = """async (canvas, png) => {
  const img = new Image();
  img.src = 'data:image/png;base64,' + png;
  await img.decode();
  const w = Math.min(img.width, canvas.width), h = Math.min(img.height, canvas.height);
  if (!w || !h) return {diff: 255, width: canvas.width, height: canvas.height};
  const ours = canvas.getContext('2d').getImageData(0, 0, w, h).data;
  const scratch = document.createElement('canvas');
  scratch.width = w;
  scratch.height = h;
  const ctx = scratch.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const theirs = ctx.getImageData(0, 0, w, h).data;
  let sum = 0;
  for (let i = 0; i < ours.length; i += 4) {
    sum += Math.abs(ours[i] - theirs[i]) + Math.abs(ours[i + 1] - theirs[i + 1])
         + Math.abs(ours[i + 2] - theirs[i + 2]);
  }
  return {diff: sum / (w * h * 3), width: canvas.width, height: canvas.height};
}"""
SAME_PICTURE = 3.0  # a caret blink or a font's anti-aliasing, not another page
FIELD_CENTRE = """(name) => {
  const r = document.querySelector(`input[name=${name}]`).getBoundingClientRect();
  return {x: r.x + r.width / 2, y: r.y + r.height / 2};
}"""
FOCUSED = "() => document.activeElement && document.activeElement.name"


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"viewer-{name}.png"))


async def wait_same_picture(canvas: Locator, remote: Page, timeout: float = 30) -> None:
    """Until the canvas shows what the VM's Chromium renders (its DevTools screenshot; the
    kiosk window covers the screen from its top left corner)."""
    deadline = time.monotonic() + timeout
    while True:
        png = base64.b64encode(await remote.screenshot()).decode()
        seen = await canvas.evaluate(COMPARE, png)
        if seen["diff"] <= SAME_PICTURE:
            return
        assert time.monotonic() < deadline, f"the canvas does not show the VM's page: {seen}"
        await asyncio.sleep(0.05)


async def wait_window(remote: Page, size: list[int], timeout: float = 10) -> None:
    """Until the VM's kiosk window has the screen's size (the agent follows a resize within
    a second; X11 leaves Chromium's window a pixel short in each direction)."""
    deadline = time.monotonic() + timeout
    while True:
        window = await remote.evaluate("() => [innerWidth, innerHeight]")
        if all(0 <= s - w <= 1 for s, w in zip(size, window, strict=True)):
            return
        assert time.monotonic() < deadline, f"the window stays {window} on a {size} screen"
        await asyncio.sleep(0.1)


# The pages do not care which database the controller uses; the lifecycle tests cover both.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_person_logs_in_through_the_viewer_page(server_factory: Any) -> None:
    started = time.monotonic()
    server: Server = server_factory(grace_success_ms=30_000)
    server.start()
    user_token = server.cli("tokens", "create", "--user", "alice")
    ARTIFACTS.mkdir(exist_ok=True)
    headers = {"Authorization": f"Bearer {user_token}"}
    async with (
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as api,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 960})
            await page.goto(f"{server.url}/")
            await page.get_by_label("API token").fill(user_token)
            await page.get_by_role("button", name="Sign in").click()
            login = page.get_by_role("button", name="Log in oauth2")
            await expect(login).to_be_enabled()
            await shot(page, "1-dashboard")

            clicked = time.monotonic()
            await login.click()
            frame_element = await page.wait_for_selector("#viewer-frame[src]")
            viewer = await frame_element.content_frame()
            assert viewer is not None
            await viewer.wait_for_load_state()
            page_loaded = time.monotonic()
            status = viewer.locator("#status")
            canvas = viewer.locator("#screen canvas")
            sessions = (await api.get("/api/auth/sessions")).json()
            session_id, vm_id = sessions[0]["sessionId"], sessions[0]["vm"]["vmId"]
            await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)

            # Read-only access to the VM's own Chromium: what it renders, where its fields
            # are, which one has the focus. Everything the person does goes through VNC.
            async with devtools_port(server.runtime, vm_id) as port:
                cdp = await pw.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
                remote = await login_page(cdp, timeout=60)
                await remote.wait_for_selector("input[name=username]")
                await wait_same_picture(canvas, remote)
                form_shown = time.monotonic()  # at most this long (the checks take time)

                # resizeSession: the remote screen took the viewer's size (Xvnc applies
                # SetDesktopSize), and the kiosk window followed it (the agent).
                screen = await viewer.locator("#screen").bounding_box()
                assert screen is not None
                fb = await canvas.evaluate("(c) => [c.width, c.height]")
                assert fb == [int(screen["width"]), int(screen["height"])], (fb, screen)
                assert fb != [1280, 800]
                await wait_window(remote, fb)
                await wait_same_picture(canvas, remote)  # the page, laid out anew
                await shot(page, "2-login-form")

                async def click_field(name: str) -> None:
                    """Click the canvas where the VM's page has field ``name``, and wait
                    until that field has the focus in the VM: the click travelled through
                    noVNC, our proxy and Xvnc."""
                    field = await remote.evaluate(FIELD_CENTRE, name)
                    box = await canvas.bounding_box()
                    assert box is not None
                    scale = box["width"] / fb[0]
                    await page.mouse.click(
                        box["x"] + field["x"] * scale, box["y"] + field["y"] * scale
                    )
                    deadline = time.monotonic() + 10
                    while await remote.evaluate(FOCUSED) != name:
                        assert time.monotonic() < deadline, f"the click did not reach {name}"
                        await asyncio.sleep(0.05)

                # The form opens with the user name focused: the password first, then back.
                await click_field("password")
                await click_field("username")
                await cdp.close()  # only the VNC path from here on

            # Keystrokes into the focused canvas: noVNC sends them as RFB key events.
            await page.keyboard.type("demo", delay=30)
            await page.keyboard.press("Tab")
            await page.keyboard.type("demo", delay=30)
            await shot(page, "3-typed")
            await page.keyboard.press("Enter")

            await expect(status).to_have_text("Connected ✓", timeout=30_000)
            countdown = viewer.locator("#countdown")
            await expect(countdown).to_have_text(re.compile(r"^\(closing in \d+ s\)$"))
            done = await wait_session(api, session_id, "completed")
            assert done["credentials"]["captured"] is True
            await shot(page, "4-connected")

            # The page calls complete a moment later: the VM goes at once ("completed"), not
            # at the end of the 30 s grace period ("grace_ended").
            await expect(countdown).to_have_text("(done: you can close this tab)", timeout=20_000)
            vm = (await api.get(f"/api/vms/{vm_id}")).json()
            assert vm["state"] == "destroyed", vm
            assert vm["destroyReason"] == "completed"
            timeline = (await api.get(f"/api/auth/session/{session_id}/timeline")).json()
            assert any(e["actor"] == "viewer:alice" for e in timeline), timeline
            await shot(page, "5-done")
        finally:
            await browser.close()
    assert vm_id not in {v.vm_id for v in await server.runtime.list()}
    print(
        f"\nviewer: login clicked -> viewer page loaded {page_loaded - clicked:.2f} s; "
        f"page loaded -> the canvas shows the VM's login form {form_shown - page_loaded:.2f} s "
        f"(click -> form {form_shown - clicked:.2f} s); "
        f"test {time.monotonic() - started:.1f} s"
    )
