"""The whole login flow, as a newcomer's ``make run`` would see it: a real server process,
a real sandbox with Xvnc and Chromium, the demo identity provider, and a person (played
by key events through the VM's VNC server) typing into the real login form."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from airlock.agent.client import AgentClient
from airlock.store.db import Database
from airlock.store.tables import Base
from tests.e2e.conftest import ARTIFACTS, Server
from tests.lifecycle_helpers import wait_for
from tests.rfb import RfbClient, StreamTransport

pytestmark = pytest.mark.e2e


async def wait_session(
    client: httpx.AsyncClient, session_id: str, status: str, timeout: float = 30
) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def reached() -> bool:
        body.update((await client.get(f"/api/auth/session/{session_id}")).json())
        return bool(body["status"] == status)

    try:
        await wait_for(reached, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"still {body['status']}: {body['failureReason']}") from None
    return body


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


XK_TAB, XK_RETURN = 0xFF09, 0xFF0D
CARD, PAGE = (255, 255, 255), (238, 241, 245)  # the demo IdP's form card and page (#eef1f5)


async def log_in_as_a_person(
    server: Server, client: httpx.AsyncClient, session_id: str, vm_id: str, shots: str = "e2e"
) -> dict[str, Any]:
    """Type the demo user's name and password into the login form in the VM's Chromium
    as key events through the VM's VNC server, as a person's keyboard would (the form
    focuses the user name: type, Tab, type, Enter). No DevTools: the VM has none."""
    del shots  # the viewer tests take the screenshots, of the live view
    await wait_session(client, session_id, "awaiting_user")
    reader, writer = await server.runtime.open_vnc(vm_id)
    rfb = RfbClient(StreamTransport(reader, writer))
    try:
        await rfb.handshake()

        async def form_shown() -> bool:  # the demo IdP's form card on its grey page
            frame = await rfb.read_frame()
            # Off the screen's centre, where Xvnc draws the pointer into the picture.
            return (rfb.pixel(frame, 850, 200), rfb.pixel(frame, 5, 5)) == (CARD, PAGE)

        # The login page loads after awaiting_user (not "Starting…").
        await wait_for(form_shown, timeout=30, interval=0.1, what="the login form on screen")
        for keysym in [*map(ord, "demo"), XK_TAB, *map(ord, "demo"), XK_RETURN]:
            await rfb.key(keysym)
            await asyncio.sleep(0.02)
        done = await wait_session(client, session_id, "completed")
    finally:
        await rfb.close()
    return done


async def run_in_vm(server: Server, vm_id: str, script: str) -> str:
    reader, writer = await server.runtime.open_agent(vm_id)
    agent = AgentClient(reader, writer)
    try:
        result = await agent.run(["sh", "-c", script])
    finally:
        await agent.close()
    assert result.exit_code == 0, result.stderr
    return result.stdout


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

        done = await log_in_as_a_person(server, client, session_id, vm_id)
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


async def test_login_with_a_cli_vm_hands_the_tokens_over(server_factory: Any) -> None:
    """Issue 4's end-to-end point: the same person's login, started with ``cliVmId``, ends
    with the tokens in the CLI VM's file (0600), ``injected.verified`` true, and no copy
    left in the browser VM."""
    server: Server = server_factory(credential_export="true", grace_success_ms=20_000)
    server.start()
    user_token = server.cli("tokens", "create", "--user", "alice")
    service_token = server.cli("tokens", "create", "--service", "web")
    headers = {"Authorization": f"Bearer {user_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
        cli_vm = (await client.post("/api/vms", json={"role": "cli"})).json()
        assert cli_vm["state"] == "running", cli_vm
        started = await client.post(
            "/api/auth/start", json={"provider": "oauth2", "cliVmId": cli_vm["vmId"]}
        )
        assert started.status_code == 201, started.text
        session_id, vm_id = started.json()["sessionId"], started.json()["vm"]["vmId"]
        await log_in_as_a_person(server, client, session_id, vm_id, shots="e2e-handoff")

        body: dict[str, Any] = {}

        async def injected_now() -> bool:
            body.update((await client.get(f"/api/auth/session/{session_id}")).json())
            return body["credentials"]["injected"] is not None

        await wait_for(injected_now, timeout=30, interval=0.1, what="injected")
        injected = body["credentials"]["injected"]
        assert injected["vmId"] == cli_vm["vmId"] and injected["verified"] is True

        secret = (
            await client.get(
                f"/api/auth/session/{session_id}/credentials?secrets=true",
                headers={"Authorization": f"Bearer {service_token}"},
            )
        ).json()["secret"]
        in_cli_vm = await run_in_vm(
            server,
            cli_vm["vmId"],
            "stat -c %a $HOME/.airlock/oauth2/tokens.json; cat $HOME/.airlock/oauth2/tokens.json",
        )
        mode, content = in_cli_vm.split("\n", 1)
        assert mode == "600"
        assert secret["accessToken"] in content and secret["refreshToken"] in content
        in_browser_vm = await run_in_vm(server, vm_id, "ls -A $HOME/.airlock/oauth2/ 2>&1; true")
        assert "tokens.json" not in in_browser_vm
