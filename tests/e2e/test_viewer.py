"""What a person does, through the pages only: open the dashboard, sign in, click "Log in
oauth2", see the identity provider's form in the live view, click once into the view (it
takes the focus, nothing else), type the user name, Tab, the password, Enter, and watch the
page say "Connected ✓"; the page then calls ``complete`` and the browser VM goes.

Real everything: an ``airlock serve --demo`` process, a sandbox with Xvnc and Chromium, the
controller's VNC proxy, noVNC from node_modules, Debian's Chromium driven by Playwright as
the person's browser. Nothing looks into the VM's Chromium (it has no DevTools): what the
test knows of the VM is what the person sees, the live view's pixels, and the session's
state. Screenshots of each step go to test-artifacts/viewer-*.png.
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
from tests.e2e.conftest import ARTIFACTS, Server
from tests.e2e.test_login import wait_session
from tests.lifecycle_helpers import wait_for

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
# The issue's own string: diacritics, a currency sign, spaces, shifted and AltGr symbols.
PASSWORD = "Pässwörd-@€#1 ok ÀZ"
PIXEL = "(c, [x, y]) => Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3))"
CARD = [255, 255, 255]  # the demo IdP's form card, in the middle of its page
PAGE = [238, 241, 245]  # the demo IdP's page background (#eef1f5)


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"viewer-{name}.png"))


async def wait_pixels(
    canvas: Locator, want: dict[str, list[int]], timeout: float = 60, tolerance: int = 0
) -> None:
    """Until the live view shows the sign-in form laid out over the whole screen: the white
    card in the middle and the page's background in the corners (a window that did not
    follow a resize leaves Xvnc's black there); each channel within ``tolerance``."""
    seen: dict[str, list[int]] = {}

    async def shown() -> bool:
        w, h = await canvas.evaluate("(c) => [c.width, c.height]")
        points = {"centre": [w // 2, h // 2], "corner": [w - 3, h - 3], "origin": [2, 2]}
        seen.update({k: await canvas.evaluate(PIXEL, points[k]) for k in want})
        return all(
            all(abs(a - b) <= tolerance for a, b in zip(seen[k], want[k], strict=True))
            for k in want
        )

    try:
        await wait_for(shown, timeout=timeout, interval=0.1)
    except AssertionError:
        await canvas.screenshot(path=str(ARTIFACTS / "viewer-form-not-shown.png"))
        raise AssertionError(f"the live view does not show the form: {seen}") from None


async def open_login(page: Page) -> tuple[Frame, Locator, Locator]:
    """Click "Log in OAuth 2.0" on the dashboard; the live view, its status and its canvas."""
    await page.get_by_role("button", name="Log in OAuth 2.0").click()
    frame_element = await page.wait_for_selector("#viewer-frame[src]")
    viewer = await frame_element.content_frame()
    assert viewer is not None
    await viewer.wait_for_load_state()
    return viewer, viewer.locator("#status"), viewer.locator("#screen canvas")


async def click_beside_the_form(page: Page, canvas: Locator) -> None:
    """One click into the live view, on the remote page but on none of its fields."""
    box = await canvas.bounding_box()
    assert box is not None
    await page.mouse.click(box["x"] + 30, box["y"] + box["height"] / 2)


async def sign_in(page: Page, user: str, password: str) -> None:
    await page.keyboard.type(user, delay=25)
    await page.keyboard.press("Tab")
    await page.keyboard.type(password, delay=25)
    await page.keyboard.press("Enter")


async def dashboard(
    pw: Any, server: Server, user_token: str, permissions: tuple[str, ...] = ()
) -> tuple[Any, Page]:
    """The person's browser on the dashboard, signed in; ``permissions`` it grants the
    dashboard's origin (the clipboard's, for the clipboard tests)."""
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = await browser.new_context(
        viewport={"width": 1280, "height": 960}, permissions=list(permissions)
    )
    page = await context.new_page()
    await page.goto(f"{server.url}/")
    await page.get_by_label("API token").fill(user_token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("button", name="Log in OAuth 2.0")).to_be_enabled()
    return browser, page


# The pages do not care which database the controller uses; the lifecycle tests cover both.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_person_logs_in_ten_times_with_one_click_and_tab(server_factory: Any) -> None:
    started = time.monotonic()
    server: Server = server_factory(grace_success_ms=30_000, demo_password=PASSWORD)
    server.start()
    user_token = server.cli("tokens", "create", "--user", "alice")
    ARTIFACTS.mkdir(exist_ok=True)
    headers = {"Authorization": f"Bearer {user_token}"}
    timings: list[float] = []
    async with (
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as api,
        async_playwright() as pw,
    ):
        browser, page = await dashboard(pw, server, user_token)
        try:
            for n in range(10):
                clicked = time.monotonic()
                viewer, status, canvas = await open_login(page)
                await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)
                # resizeSession: the remote screen took the view's size, and the kiosk
                # window followed it (the agent's X11 fit): the form fills the new screen.
                await wait_pixels(canvas, {"centre": CARD, "corner": PAGE, "origin": PAGE})
                screen = await viewer.locator("#screen").bounding_box()
                assert screen is not None
                fb = await canvas.evaluate("(c) => [c.width, c.height]")
                assert fb == [int(screen["width"]), int(screen["height"])], (fb, screen)
                assert fb != [1280, 800]
                timings.append(time.monotonic() - clicked)
                if n == 0:
                    await shot(page, "1-login-form")
                await click_beside_the_form(page, canvas)
                await expect(viewer.locator("#screen")).to_have_class(re.compile("focused"))
                await sign_in(page, "demo", PASSWORD)
                try:
                    await expect(status).to_have_text("Connected ✓", timeout=30_000)
                except AssertionError:
                    await shot(page, f"failed-login-{n}")
                    raise
                sessions = (await api.get("/api/auth/sessions")).json()
                done = await wait_session(api, sessions[0]["sessionId"], "completed")
                assert done["credentials"]["captured"] is True
                if n == 0:
                    await shot(page, "2-connected")
                    countdown = viewer.locator("#countdown")
                    await expect(countdown).to_have_text(
                        "(done: you can close this tab)", timeout=20_000
                    )
                    vm = (await api.get(f"/api/vms/{done['vm']['vmId']}")).json()
                    assert vm["state"] == "destroyed" and vm["destroyReason"] == "completed"
                    timeline = (
                        await api.get(f"/api/auth/session/{done['sessionId']}/timeline")
                    ).json()
                    assert any(e["actor"] == "viewer:alice" for e in timeline), timeline
            sessions = (await api.get("/api/auth/sessions")).json()
            assert len(sessions) == 10
            assert [s["status"] for s in sessions] == ["completed"] * 10
        finally:
            await browser.close()
    print(
        f"\nviewer: 10 logins; login clicked -> the form in the live view "
        f"median {sorted(timings)[5]:.2f} s, max {max(timings):.2f} s; "
        f"test {time.monotonic() - started:.1f} s"
    )


async def _sign_in_fixing_typos(server_factory: Any, name: str, *, shortcuts: bool) -> None:
    """Arrows, End, Backspace (held), Escape, Tab and Shift+Tab (with ``shortcuts``, Ctrl+A/X/Z
    and Ctrl+Shift+Z) as a person fixes typos: the demo IdP signs in only if every field ends
    up exactly right, so a key that does something else, or nothing, fails the login."""
    server: Server = server_factory(grace_success_ms=30_000, demo_password=PASSWORD)
    server.start()
    user_token = server.cli("tokens", "create", "--user", "alice")
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        browser, page = await dashboard(pw, server, user_token)
        try:
            viewer, status, canvas = await open_login(page)
            await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)
            await wait_pixels(canvas, {"centre": CARD, "corner": PAGE})
            await click_beside_the_form(page, canvas)
            await expect(viewer.locator("#screen")).to_have_class(re.compile("focused"))
            keys = page.keyboard
            await keys.type("dmo", delay=25)  # a typo: the e is missing
            for key in ("ArrowLeft", "ArrowLeft"):
                await keys.press(key)
            await keys.type("e")  # "demo"
            await keys.press("End")
            await keys.type("XYZWV", delay=25)
            for _ in range(5):  # Backspace held down: a first press, then auto-repeats
                await keys.down("Backspace")
                await asyncio.sleep(0.03)
            await keys.up("Backspace")  # "demo" again
            await keys.press("Escape")  # nothing to close: the field keeps its text
            await keys.press("Tab")
            if shortcuts:
                await keys.type("wrong password", delay=25)
                await keys.press("Control+a")
                await keys.type(PASSWORD, delay=25)  # replaces the selection
                await keys.press("Shift+Tab")  # back to the user name
                # Upper-case keys with no Shift, as a key with Caps Lock on gives (and
                # Playwright's "Control+A"): a local browser takes them as Ctrl+A, so must
                # the live view (Xvnc alone would add a Shift: Ctrl+Shift+A).
                await keys.press("Control+A")
                await keys.press("Control+X")  # the field is empty now...
                await keys.press("Control+Z")  # ...and "demo" again
                await keys.press("Control+Shift+Z")  # redo: empty...
                await keys.press("Control+z")  # ...and "demo"
            else:
                await keys.type(PASSWORD + "!", delay=25)
                await keys.press("Backspace")
                await keys.press("Shift+Tab")  # back to the user name, and on again
            await keys.press("Tab")
            await keys.press("Enter")
            try:
                await expect(status).to_have_text("Connected ✓", timeout=30_000)
            except AssertionError:
                await shot(page, name)
                raise
        finally:
            await browser.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_editing_keys_behave_as_in_a_local_browser(server_factory: Any) -> None:
    await _sign_in_fixing_typos(server_factory, "editing-keys-failed", shortcuts=False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_select_all_cut_and_undo_behave_as_in_a_local_browser(server_factory: Any) -> None:
    await _sign_in_fixing_typos(server_factory, "shortcuts-failed", shortcuts=True)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_person_on_a_phone_raises_the_keyboard_and_signs_in(server_factory: Any) -> None:
    """A phone: a touch screen, no physical keyboard. The Keyboard button focuses the view's
    text area in the tap (what raises the on-screen keyboard); the on-screen keyboard's text
    comes as input events, its Enter as a key. The remote screen fits the phone's width."""
    server: Server = server_factory(grace_success_ms=30_000, demo_password=PASSWORD)
    server.start()
    user_token = server.cli("tokens", "create", "--user", "alice")
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 412, "height": 915}, is_mobile=True, has_touch=True
            )
            page = await context.new_page()
            await page.goto(f"{server.url}/")
            await page.get_by_label("API token").fill(user_token)
            await page.get_by_role("button", name="Sign in").tap()
            await expect(page.get_by_role("button", name="Log in OAuth 2.0")).to_be_enabled()
            viewer, status, canvas = await open_login(page)
            await expect(status).to_have_text("Sign in with oauth2", timeout=60_000)
            # On a phone the form is taller than the screen: its card's shadow reaches the
            # top corner, a shade darker than the page (not Xvnc's black).
            await wait_pixels(canvas, {"centre": CARD, "origin": PAGE}, tolerance=8)
            box = await canvas.bounding_box()
            frame = await viewer.locator("#screen").bounding_box()
            assert box is not None and frame is not None
            assert box["width"] <= frame["width"] + 1, (box, frame)  # the screen fits
            keyboard = viewer.get_by_role("button", name="Keyboard")
            await expect(keyboard).to_be_visible()  # shown on touch screens only
            await keyboard.tap()
            await expect(viewer.locator("#keys")).to_be_focused()
            await page.keyboard.insert_text("demo")  # what an on-screen keyboard sends
            await page.keyboard.press("Enter")  # empty password: the form focuses it
            await page.keyboard.insert_text(PASSWORD)
            await shot(page, "phone")
            await page.keyboard.press("Enter")
            await expect(status).to_have_text("Connected ✓", timeout=30_000)
        finally:
            await browser.close()
