"""The viewer page and the routes it calls with its viewer token (events, keepalive,
complete), and the dashboard's static serving. In process, no VM (rows as the services
write them); the whole flow through a real VM is tests/e2e/test_viewer.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock.api import static
from airlock.api.deps import ViewerSigner
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from tests.api.conftest import Api
from tests.api.live import read_sse
from tests.api.test_errors import assert_error
from tests.api.test_routes import _move_vm, parse_sse


def mint(api: Api, session_id: str, vm_id: str, *, view_only: bool = False) -> str:
    signer = api.app.state.viewer_signer
    assert isinstance(signer, ViewerSigner)
    return signer.mint(session_id, vm_id, now=api.core.clock.now(), view_only=view_only)


async def test_the_page_opens_with_its_own_sessions_token_only(api: Api) -> None:
    session, vm = await api.add_session("alice")
    other, other_vm = await api.add_session("bob")
    token = mint(api, session.id, vm.id)
    page = f"/api/auth/session/{session.id}/novnc"

    r = await api.client.get(page, params={"token": token})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert 'src="/static/app/viewer.js"' in r.text
    assert 'role="status"' in r.text and 'aria-live="polite"' in r.text
    # The token is in the URL: no Referer, no cache; only our own pages may frame it.
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'self'" in r.headers["content-security-policy"]

    for params in (
        {},
        {"token": "junk"},
        {"token": mint(api, other.id, other_vm.id)},  # bob's token on alice's session
        {"token": api.tokens["alice"]},  # an API token is not a viewer token
    ):
        refused = await api.client.get(page, params=params)
        assert refused.status_code == 401, params
        assert refused.headers["content-type"].startswith("text/html")
        assert "This viewer link does not work" in refused.text
    # Nor does a viewer token open anything else.
    r = await api.client.get(
        f"/api/auth/session/{session.id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert_error(r, 401)

    # Once the VM is gone, the page says the login is over (404, as verify_viewer_token).
    await _move_vm(api, vm.id, VmState.RUNNING, VmState.DESTROYED, publish=None)
    gone = await api.client.get(page, params={"token": token})
    assert gone.status_code == 404 and "This viewer link does not work" in gone.text


async def test_without_novnc_the_page_says_set_up_did_not_run(
    api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    session, vm = await api.add_session("alice")
    monkeypatch.setattr(static, "NOVNC_DIR", tmp_path / "missing")
    r = await api.client.get(
        f"/api/auth/session/{session.id}/novnc", params={"token": mint(api, session.id, vm.id)}
    )
    assert r.status_code == 503
    assert "Set-up did not run" in r.text and "make setup" in r.text


async def test_keepalive_and_complete_with_the_viewer_token(api: Api) -> None:
    session, vm = await api.add_session("alice")
    token = mint(api, session.id, vm.id)
    base = f"/api/auth/session/{session.id}/viewer"

    assert_error(await api.client.post(f"{base}/keepalive"), 401)
    assert_error(await api.client.post(f"{base}/keepalive", params={"token": "x"}), 401)
    r = await api.client.post(f"{base}/keepalive", params={"token": token})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"destroyAfter"}  # no fresh token: never traded for a new one
    assert r.json()["destroyAfter"] is not None

    # Not over yet: nothing to complete, and nothing changed.
    assert_error(await api.client.post(f"{base}/complete", params={"token": token}), 409)
    assert api.runtime.destroyed == []

    async with api.core.db.transaction() as repo:
        row = await repo.auth_session(session.id)
        assert row is not None
        row.status = SessionStatus.COMPLETED.value
    await _move_vm(api, vm.id, VmState.RUNNING, VmState.DRAINING, publish=None)
    # Support staff watching with a view-only token cannot end it.
    view_only = mint(api, session.id, vm.id, view_only=True)
    r = await api.client.post(f"{base}/complete", params={"token": view_only})
    assert_error(r, 403, "view_only")
    assert api.runtime.destroyed == []

    r = await api.client.post(f"{base}/complete", params={"token": token})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert body["session"]["vm"]["state"] == "destroyed"
    assert body["session"]["vm"]["destroyReason"] == "completed"
    assert body["session"]["novncURL"] is None
    assert api.runtime.destroyed == [vm.id]
    timeline = await api.client.get(
        f"/api/auth/session/{session.id}/timeline", headers=api.auth("alice")
    )
    assert any(e["actor"] == "viewer:alice" for e in timeline.json())
    # The VM is gone: the token opens nothing any more.
    r = await api.client.post(f"{base}/keepalive", params={"token": token})
    assert_error(r, 404)


async def test_events_with_the_viewer_token_carry_no_viewer_url(api: Api) -> None:
    session, vm = await api.add_session("alice")
    token = mint(api, session.id, vm.id)
    url = f"/api/auth/session/{session.id}/viewer/events"
    assert_error(await api.client.get(url), 401)
    assert_error(await api.client.get(url, headers=api.auth("alice")), 401)

    async def change(line: str, _lines: list[str]) -> None:
        # Each change once the stream has sent the state before it.
        if line.startswith("data: ") and '"running"' in line:
            await _move_vm(api, vm.id, VmState.RUNNING, VmState.DRAINING, publish=session.id)
        elif line.startswith("data: ") and '"draining"' in line:
            await _move_vm(api, vm.id, VmState.DRAINING, VmState.DESTROYED, publish=session.id)

    events, _ = parse_sse(await read_sse(api.app, url, change, params={"token": token}))
    assert [e["vm"]["state"] for e in events] == ["running", "draining", "destroyed"]
    assert all(e["novncURL"] is None for e in events)
    assert events[0]["sessionId"] == session.id


async def test_the_dashboard_and_static_files_leave_the_api_alone(api: Api) -> None:
    r = await api.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="/static/app/dashboard.js"' in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    for path in ("/static/app/dashboard.js", "/static/app/viewer.js"):
        r = await api.client.get(path)
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], path
    assert (await api.client.get("/static/app/../routes/viewer.py")).status_code == 404
    assert (await api.client.get("/healthz")).status_code == 200
    assert (await api.client.get("/docs")).status_code == 200
    assert (await api.client.get("/openapi.json")).status_code == 200
    assert_error(await api.client.get("/api/nope", headers=api.auth("alice")), 404)
    if static.novnc_installed():
        r = await api.client.get("/static/novnc/core/rfb.js")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
        assert "export default class RFB" in r.text
