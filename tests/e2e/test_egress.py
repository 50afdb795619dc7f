"""The egress policy on the demo, the way a person sees it: a real ``airlock serve --demo``,
a real sandbox with Xvnc and Chromium, the demo IdP served on three names (the page on
``idp.airlock.test``, its stylesheet and script on ``static.idp.airlock.test``, single
sign-on on ``sso.login.airlock.test`` under a ``*.login.airlock.test`` rule).

Everything the test knows of the VM's screen comes through the controller's VNC WebSocket
(the person's viewer path, ``tests/rfb.py``): screenshots of the framebuffer, key presses
and a pointer move. No DevTools. With the policy the page is styled (its grey background
fills the screen), its script ran (it shows the SSO button, which the keyboard reaches),
and the SSO path completes the login. With the asset host denied, the page is plain HTML,
the timeline and ``/egress`` name the host, and the viewer page says part of it was
blocked. Learn mode on a policy that lacks both hosts yields a policy that, applied, works.
Screenshots go to test-artifacts/egress-*.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import async_playwright, expect
from websockets.asyncio.client import connect

from airlock.api import static
from tests.e2e.conftest import ARTIFACTS, Server
from tests.e2e.test_login import wait_session
from tests.lifecycle_helpers import wait_for
from tests.rfb import RfbClient, Screenshot, WsTransport

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

PAGE_GREY = (0xEE, 0xF1, 0xF5)  # the stylesheet's background: only a styled page has it
WHITE = (0xFF, 0xFF, 0xFF)  # an unstyled page's background
CHECKS_GREEN = (0x1E, 0x7A, 0x3A)  # the line the page's script writes
TAB, ENTER = 0xFF09, 0xFF0D
CHROMIUM = "/usr/lib/chromium/chromium"


def idp_port(server: Server) -> int:
    return int(server.env["AIRLOCK_DEMO_IDP_PORT"])


@contextlib.asynccontextmanager
async def vnc(server: Server, api: httpx.AsyncClient, session_id: str) -> AsyncIterator[RfbClient]:
    """The session's screen over the controller's VNC WebSocket, with the viewer token of
    its ``novncURL``, as the viewer page connects."""
    body = (await api.get(f"/api/auth/session/{session_id}")).json()
    token = parse_qs(urlsplit(body["novncURL"]).query)["token"][0]
    url = f"ws://127.0.0.1:{server.port}/api/auth/session/{session_id}/vnc?token={token}"
    async with connect(url, subprotocols=["binary"], max_size=None) as ws:  # type: ignore[list-item]
        rfb = RfbClient(WsTransport(ws))
        await rfb.handshake()
        await rfb.true_colour()
        yield rfb


async def wait_screen(
    rfb: RfbClient, check: Callable[[Screenshot], bool], what: str, timeout: float = 60
) -> Screenshot:
    shots: list[Screenshot] = []

    async def showing() -> bool:
        shots[:] = [await rfb.screenshot()]
        return check(shots[0])

    await wait_for(showing, timeout=timeout, interval=0.25, what=f"the screen shows {what}")
    return shots[0]


async def settled(rfb: RfbClient, timeout: float = 30) -> Screenshot:
    """A screenshot once the screen has stopped changing (two alike, half a second apart)."""
    deadline = time.monotonic() + timeout
    last = await rfb.screenshot()
    while True:
        await asyncio.sleep(0.5)
        shot = await rfb.screenshot()
        if shot.bgrx == last.bgrx:
            return shot
        assert time.monotonic() < deadline, "the screen kept changing"
        last = shot


async def type_keys(rfb: RfbClient, text: str) -> None:
    for ch in text:
        await rfb.key(ord(ch))
        await asyncio.sleep(0.03)  # a person's pace; Xvnc takes them in order anyway


def save(shot: Screenshot, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"egress-{name}.png").write_bytes(shot.png())


def styled(shot: Screenshot) -> bool:
    return shot.share(PAGE_GREY) > 0.3 and shot.share(CHECKS_GREEN, tolerance=40) > 0


async def egress(api: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    r = await api.get(f"/api/auth/session/{session_id}/egress")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def start(api: httpx.AsyncClient) -> tuple[str, str]:
    started = await api.post("/api/auth/start", json={"provider": "oauth2"})
    assert started.status_code == 201, started.text
    session_id, vm_id = started.json()["sessionId"], started.json()["vm"]["vmId"]
    await wait_session(api, session_id, "awaiting_user", timeout=60)
    return session_id, vm_id


async def log_in_with_sso(rfb: RfbClient, api: httpx.AsyncClient, session_id: str) -> None:
    """What a person does on the complete page: point at the page (the pointer gives the
    window the keyboard), Tab past the form to "Continue with Demo SSO", Enter; on the SSO
    host's page type name and password, Enter."""
    await rfb.pointer(8, 8)  # an empty corner: focus stays with the autofocused user name
    for _ in range(3):  # user name -> password -> Sign in -> Continue with Demo SSO
        await rfb.key(TAB)
        await asyncio.sleep(0.1)
    await rfb.key(ENTER)

    # The SSO host's page: styled by the same asset host, its own form, and no script line.
    def sso_page(shot: Screenshot) -> bool:
        return shot.share(PAGE_GREY) > 0.3 and shot.share(CHECKS_GREEN, tolerance=40) == 0

    await wait_screen(rfb, sso_page, "the SSO page")
    sso = await settled(rfb)  # loaded and painted: its autofocus is on the user name
    assert sso_page(sso)
    save(sso, "sso-page")
    await type_keys(rfb, "demo")
    await rfb.key(TAB)
    await type_keys(rfb, "demo")
    await rfb.key(ENTER)
    done = await wait_session(api, session_id, "completed", timeout=60)
    assert done["credentials"]["captured"] is True


async def complete_page_and_sso_login(server: Server, shots: str) -> Screenshot:
    """The acceptance path with a policy that allows what the page needs."""
    token = server.cli("tokens", "create", "--user", "alice")
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as api:
        session_id, _ = await start(api)
        async with vnc(server, api, session_id) as rfb:
            page = await wait_screen(rfb, styled, "the styled page with its script's line")
            save(page, f"{shots}-complete")
            await log_in_with_sso(rfb, api, session_id)
            save(await rfb.screenshot(), f"{shots}-done")
        report = await egress(api, session_id)
        assert report["denied"] == [], report
        timeline = (await api.get(f"/api/auth/session/{session_id}/timeline")).json()
        assert not [e for e in timeline if e["kind"] == "egress" and e["cause"] == "denied"]
        await api.delete(f"/api/auth/session/{session_id}")
    return page


@pytest.mark.skipif(not static.novnc_installed(), reason="noVNC is not installed")
async def test_the_policy_makes_the_page_complete_and_its_absence_visible(
    server_factory: Any,
) -> None:
    # With the demo's own policy: styled, script running, SSO completes the login.
    server: Server = server_factory(grace_success_ms=5_000)
    server.start()
    complete = await complete_page_and_sso_login(server, "policy")
    print(f"complete page: grey {complete.share(PAGE_GREY):.3f}, white {complete.share(WHITE):.3f}")
    server.stop()

    # The asset host removed from the policy (the operator's deny setting).
    port = idp_port(server)
    server = server_factory(egress_oauth2_deny=f"static.idp.airlock.test:{port}")
    server.env["AIRLOCK_DEMO_IDP_PORT"] = str(port)
    server.start()
    token = server.cli("tokens", "create", "--user", "bob")
    denied_host = f"static.idp.airlock.test:{port}"
    async with (
        httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as api,
        async_playwright() as pw,
    ):
        session_id, _ = await start(api)

        async def named() -> bool:
            return any(
                h["host"] == "static.idp.airlock.test"
                for h in (await egress(api, session_id))["denied"]
            )

        await wait_for(
            named, timeout=30, interval=0.2, what="the egress route names the asset host"
        )
        async with vnc(server, api, session_id) as rfb:
            broken = await settled(rfb)
        save(broken, "denied-broken")
        print(f"broken page: grey {broken.share(PAGE_GREY):.3f}, white {broken.share(WHITE):.3f}")
        assert broken.share(PAGE_GREY) < 0.02, "the page is styled without its stylesheet?"
        assert broken.share(WHITE) > 0.8  # plain HTML on a white page
        assert broken.share(CHECKS_GREEN, tolerance=40) == 0  # its script never ran
        difference = complete.difference(broken)
        print(f"complete vs broken: mean difference {difference:.1f} per channel")
        assert difference > 10

        report = await egress(api, session_id)
        (row,) = [h for h in report["denied"] if h["host"] == "static.idp.airlock.test"]
        assert row["port"] == port and row["count"] >= 2  # the stylesheet and the script
        assert report["provider"] == "oauth2" and report["learn"] is False
        timeline = (await api.get(f"/api/auth/session/{session_id}/timeline")).json()
        entries = [e for e in timeline if e["kind"] == "egress"]
        assert [(e["cause"], e["host"]) for e in entries] == [("denied", denied_host)]
        assert entries[0]["count"] == row["count"]  # one entry per host, counted

        # The person's viewer page says so, over its events stream.
        body = (await api.get(f"/api/auth/session/{session_id}")).json()
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(body["novncURL"])
            notice = page.locator("#egress-notice")
            await expect(notice).to_contain_text("Part of this page was blocked by policy")
            await expect(notice).to_contain_text("static.idp.airlock.test")
            await page.screenshot(path=str(ARTIFACTS / "egress-viewer-notice.png"))
        finally:
            await browser.close()
        await api.delete(f"/api/auth/session/{session_id}")
    logs = server.all_logs()
    assert f"the egress policy denied {denied_host}" in logs


async def test_learn_mode_yields_a_policy_that_works(server_factory: Any) -> None:
    # An operator who knows only the IdP's endpoints: nothing else allowed, learn mode on.
    server: Server = server_factory(
        egress_oauth2_policy="", egress_oauth2_learn="true", grace_success_ms=5_000
    )
    server.start()
    port = idp_port(server)
    token = server.cli("tokens", "create", "--user", "alice")
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as api:
        session_id, _ = await start(api)
        async with vnc(server, api, session_id) as rfb:
            save(await wait_screen(rfb, styled, "the page, learn mode letting it load"), "learn")
            await log_in_with_sso(rfb, api, session_id)
        report = await egress(api, session_id)
        assert report["learn"] is True and report["denied"] == []
        learned = {(h["host"], h["port"]) for h in report["learned"]}
        assert learned == {("static.idp.airlock.test", port), ("sso.login.airlock.test", port)}
        timeline = (await api.get(f"/api/auth/session/{session_id}/timeline")).json()
        assert {e["host"] for e in timeline if e["kind"] == "egress"} == {
            f"static.idp.airlock.test:{port}",
            f"sso.login.airlock.test:{port}",
        }
    logs = server.all_logs()
    assert "egress LEARN MODE is on for oauth2" in logs  # at start
    assert f"egress LEARN MODE for session {session_id}" in logs  # and per session
    suggestion = server.cli("egress", "suggest", "oauth2", "--demo")
    print(suggestion)
    line = suggestion.splitlines()[-1]
    name, _, value = line.partition("=")
    assert name == "AIRLOCK_EGRESS_OAUTH2_POLICY"
    assert value == f"sso.login.airlock.test:{port},static.idp.airlock.test:{port}"
    server.stop()

    # Without learn mode that starting policy breaks the page: the asset host is denied.
    server = server_factory(egress_oauth2_policy="")
    server.env["AIRLOCK_DEMO_IDP_PORT"] = str(port)
    server.start()
    token = server.cli("tokens", "create", "--user", "carol")
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as api:
        session_id, _ = await start(api)

        async def denied() -> bool:
            hosts = {h["host"] for h in (await egress(api, session_id))["denied"]}
            return "static.idp.airlock.test" in hosts

        await wait_for(denied, timeout=30, interval=0.2, what="the asset host denied")
        await api.delete(f"/api/auth/session/{session_id}")
    server.stop()

    # The suggested policy, applied: the page is complete and the SSO login goes through.
    server = server_factory(egress_oauth2_policy=value, grace_success_ms=5_000)
    server.env["AIRLOCK_DEMO_IDP_PORT"] = str(port)
    server.start()
    await complete_page_and_sso_login(server, "learned-policy")


async def test_the_route_is_the_owners_only(server_factory: Any) -> None:
    server: Server = server_factory()
    server.start()
    alice = server.cli("tokens", "create", "--user", "alice")
    mallory = server.cli("tokens", "create", "--user", "mallory")
    service = server.cli("tokens", "create", "--service", "web")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as api:
        started = await api.post(
            "/api/auth/start",
            json={"provider": "oauth2"},
            headers={"Authorization": f"Bearer {alice}"},
        )
        session_id = started.json()["sessionId"]
        url = f"/api/auth/session/{session_id}/egress"
        other = await api.get(url, headers={"Authorization": f"Bearer {mallory}"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "session_not_found"
        assert (await api.get(url)).status_code == 401
        forged = await api.get(url, headers={"Authorization": f"Bearer {alice}x"})
        assert forged.status_code == 401
        junk = await api.get(
            "/api/auth/session/not-an-id/egress", headers={"Authorization": f"Bearer {alice}"}
        )
        assert junk.status_code == 400 and junk.json()["error"]["code"] == "invalid_id"
        for token in (alice, service):
            ok = await api.get(url, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json()["sessionId"] == session_id
        await api.delete(
            f"/api/auth/session/{session_id}", headers={"Authorization": f"Bearer {alice}"}
        )
