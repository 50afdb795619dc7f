"""The dashboard in a real browser (Debian's Chromium via Playwright) against an in-process
controller on a loopback port: sign in with a token (kept for the tab), the provider
buttons, sessions and CLI VMs with their live state, cancel, destroy, a session's timeline,
sign out. No VM runs (``NoVmRuntime``); starting a login through it is the e2e test."""

from __future__ import annotations

import pytest
from playwright.async_api import Browser, expect

from airlock.domain.grants import GrantState
from airlock.domain.vms import VmState
from tests.api.conftest import Api
from tests.api.live import serve
from tests.api.test_viewer_status import browser  # noqa: F401  (the fixture)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_sign_in_watch_act_and_sign_out(api: Api, browser: Browser) -> None:  # noqa: F811
    session, _ = await api.add_session("alice")
    await api.add_session("bob")  # not alice's: never shown to her
    cli_vm = await api.add_vm("alice")
    async with serve(api.app, lifespan=False) as url:
        page = await browser.new_page()
        await page.goto(f"{url}/")
        token_field = page.get_by_label("API token")
        await token_field.fill("alk_not-a-token")
        await token_field.press("Enter")  # the keyboard is enough
        await expect(page.get_by_role("alert")).to_have_text("That token was not accepted.")

        await token_field.fill(api.tokens["alice"])
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("button", name="Log in OAuth 2.0")).to_be_visible()
        rows = page.locator("#sessions tr")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("awaiting_user")
        await expect(rows.first).to_contain_text(session.id[:8])
        await expect(page.locator("#vms tr")).to_have_count(1)
        await expect(page.locator("#vms tr").first).to_contain_text(cli_vm.id)

        # The token is kept for this tab: a reload stays signed in.
        await page.reload()
        await expect(rows).to_have_count(1)

        # Cancel: the row follows, and the timeline tells what happened and who did it.
        await rows.first.get_by_role("button", name="Cancel").click()
        await expect(rows.first).to_contain_text("cancelled")
        await rows.first.get_by_role("button", name="Timeline").click()
        timeline = page.locator("#timeline")
        await expect(timeline).to_contain_text("cancelled")
        await expect(timeline).to_contain_text("user:alice")

        # A CLI VM destroyed from its row.
        await page.locator("#vms tr").first.get_by_role("button", name="Destroy").click()
        await expect(page.locator("#vms tr").first).to_contain_text(VmState.DESTROYED.value)

        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_label("API token")).to_be_focused()
        assert await page.evaluate("sessionStorage.length") == 0
        await page.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_each_cli_vm_shows_its_logins_and_the_buttons_act(
    api: Api,
    browser: Browser,  # noqa: F811
) -> None:
    """A person sees, in each CLI VM's row, the vendor's name and the login's state and
    expiry; "Log in again" and "Log in" start a login for that provider into that VM,
    "Move here" asks to move the login there."""
    from tests.api.test_credentials import add_login

    holder = await api.add_vm("alice")
    other = await api.add_vm("alice")
    await add_login(api, "alice", grant_id="g-revoked", state=GrantState.REVOKED, holder=holder.id)
    async with serve(api.app, lifespan=False) as url:
        page = await browser.new_page()
        await page.goto(f"{url}/")
        await page.get_by_label("API token").fill(api.tokens["alice"])
        await page.get_by_role("button", name="Sign in").click()
        held = page.locator(f'#vms tr[data-vm-id="{holder.id}"]')
        await expect(held).to_contain_text("OAuth 2.0")
        await expect(held).to_contain_text("alice@airlock.test: revoked")
        await expect(held.locator(".state-revoked")).to_be_visible()
        await expect(page.locator("#logins tr").first).to_contain_text("revoked")
        await expect(page.locator("#logins tr").first).to_contain_text(holder.id)
        elsewhere = page.locator(f'#vms tr[data-vm-id="{other.id}"]')
        await expect(elsewhere).to_contain_text(f"in {holder.id}")

        # Log in again: a login of that provider for that VM starts (this controller runs
        # no VM, so it ends failed, but its request named the VM).
        await held.get_by_role("button", name="Log in again").click()
        await expect(page.locator("#sessions tr")).to_have_count(1)
        await expect(page.locator("#sessions tr").first).to_contain_text("oauth2")
        async with api.core.db.read() as repo:
            [session] = await repo.auth_sessions()
        assert (session.provider, session.cli_vm_id) == ("oauth2", holder.id)

        # Move here: the move is asked for; the holder cannot be reached here, and the page
        # says so.
        await elsewhere.get_by_role("button", name="Move here").click()
        await expect(page.get_by_role("alert")).to_contain_text("Cannot move the OAuth 2.0 login")
        await page.close()
