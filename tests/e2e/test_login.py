"""The whole login flow, as a newcomer's ``make run`` would see it: a real server process,
a real sandbox with Xvnc and Chromium, the demo identity provider, and a person (played
by Playwright over Chromium's DevTools) typing into the real login form."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, async_playwright
from sqlalchemy import select

from airlock.agent.client import AgentClient
from airlock.store.db import Database
from airlock.store.tables import Base
from tests.e2e.conftest import ARTIFACTS, Server, devtools_port

pytestmark = pytest.mark.e2e


async def wait_session(
    client: httpx.AsyncClient, session_id: str, status: str, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = (await client.get(f"/api/auth/session/{session_id}")).json()
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, f"still {body['status']}: {body['failureReason']}"
        await asyncio.sleep(0.1)


async def dump_database(url: str) -> str:
    """Every row of every table as text (bytes as hex too), for grepping."""
    db = Database(url)
    parts: list[str] = []
    try:
        async with db.engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                for row in (await conn.execute(select(table))).mappings():
                    for key, value in row.items():
                        text = value.hex() if isinstance(value, bytes) else str(value)
                        parts.append(f"{table.name}.{key}={text}")
                        if isinstance(value, bytes):
                            parts.append(value.decode("latin-1"))
    finally:
        await db.close()
    return "\n".join(parts)


async def login_page(browser: Any, timeout: float = 20) -> Page:
    """The tab the login program opened on the identity provider's authorize page."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for context in browser.contexts:
            for page in context.pages:
                if "/authorize" in page.url:
                    return page  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError("the login page never opened in the VM's Chromium")


async def test_login_through_the_sandboxed_chromium(server_factory: Any) -> None:
    server: Server = server_factory(credential_export="true", grace_success_ms=20_000)
    server.start()
    user_token = server.cli("tokens", "create", "--user", "alice")
    service_token = server.cli("tokens", "create", "--service", "web")
    ARTIFACTS.mkdir(exist_ok=True)
    headers = {"Authorization": f"Bearer {user_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        started = await client.post("/api/auth/start", json={"provider": "oauth2"})
        assert started.status_code == 201, started.text
        body = started.json()
        assert {"sessionId", "status", "novncURL"} <= body.keys()
        assert body["status"] in ("initializing", "awaiting_user")
        session_id, vm_id = body["sessionId"], body["vm"]["vmId"]
        assert body["vm"]["runtime"] == "sandbox"

        await wait_session(client, session_id, "awaiting_user")
        async with devtools_port(server.runtime, vm_id) as port, async_playwright() as pw:
            browser = await pw.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
            page = await login_page(browser)
            await page.wait_for_selector("input[name=username]")
            assert "sign in" in (await page.title()).lower()
            await page.screenshot(path=str(ARTIFACTS / "e2e-login-form.png"))
            # A person: the user name field has focus; type, Tab, type, Enter.
            await page.keyboard.type("demo", delay=20)
            await page.keyboard.press("Tab")
            await page.keyboard.type("demo", delay=20)
            await page.keyboard.press("Enter")
            done = await wait_session(client, session_id, "completed")
            await page.screenshot(path=str(ARTIFACTS / "e2e-login-done.png"))
            await browser.close()

        assert done["credentials"]["captured"] is True
        assert done["vm"]["state"] == "draining"

        # The secret values, read the one sanctioned way (service token + export on).
        secrets = (
            await client.get(
                f"/api/auth/session/{session_id}/credentials?secrets=true",
                headers={"Authorization": f"Bearer {service_token}"},
            )
        ).json()
        values = [secrets["secret"]["accessToken"], secrets["secret"]["refreshToken"]]
        assert all(isinstance(v, str) and len(v) > 16 for v in values)

        # Stored encrypted: not in the database file; never logged.
        db_url = server.env["AIRLOCK_DATABASE_URL"]
        if db_url.startswith("sqlite"):
            db_file = Path(db_url.split(":///", 1)[1])
            raw = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))
            assert raw and not any(v.encode() in raw for v in values)
        dump = await dump_database(db_url)
        assert "ciphertext" in dump and not any(v in dump for v in values)
        logs = server.all_logs()
        assert "session awaiting_user -> completed" in logs or "completed" in logs
        for secret in [*values, user_token, service_token]:
            assert secret not in logs

        # Wiped from the browser VM.
        reader, writer = await server.runtime.open_agent(vm_id)
        agent = AgentClient(reader, writer)
        try:
            listing = await agent.run(["sh", "-c", "ls -A $HOME/.airlock/oauth2/ 2>&1"])
        finally:
            await agent.close()
        assert "tokens.json" not in listing.stdout

        # The frontend's cleanup: the VM goes at once.
        completed = await client.post(f"/api/auth/session/{session_id}/complete")
        assert completed.status_code == 200, completed.text
        assert completed.json()["success"] is True
        vm = (await client.get(f"/api/vms/{vm_id}")).json()
        assert vm["state"] == "destroyed" and vm["destroyReason"] == "completed"
        assert vm_id not in {v.vm_id for v in await server.runtime.list()}
