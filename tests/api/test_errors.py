"""Errors: one shape everywhere, the right 4xx for bad input (never a 500), nothing changed
by a refused request, and no detail leaked by an unexpected failure."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from airlock.domain import IllegalTransition
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from tests.api.conftest import Api


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


async def test_unknown_route_and_method(api: Api) -> None:
    assert_error(await api.client.get("/api/nope", headers=api.auth("alice")), 404, "not_found")
    assert_error(await api.client.get("/nope"), 404, "not_found")
    assert_error(
        await api.client.put("/api/auth/sessions", headers=api.auth("alice")),
        405,
        "method_not_allowed",
    )


MALFORMED_SESSION_IDS = ["abc", "0" * 31, "0" * 33, "G" * 32, "../" * 11, "x" * 5000]


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/events"),
        ("POST", "/keepalive"),
        ("POST", "/complete"),
        ("DELETE", ""),
        ("GET", "/credentials"),
        ("GET", "/timeline"),
    ],
)
async def test_malformed_session_ids(api: Api, method: str, suffix: str) -> None:
    for session_id in MALFORMED_SESSION_IDS:
        r = await api.client.request(
            method, f"/api/auth/session/{session_id}{suffix}", headers=api.auth("alice")
        )
        if "/" in session_id:  # another path: no route, or not this one
            if r.request.url.path == "/":
                continue  # "../" all the way up: the dashboard's page
            assert_error(r, r.status_code)
            assert r.status_code in (404, 405), r.text
        else:
            assert_error(r, 400, "invalid_id")
    assert await api.counts() == (0, 0)


@pytest.mark.parametrize("vm_id", ["vm-", "nope", "vm-a_b", "vm-" + "a" * 80])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_malformed_vm_ids(api: Api, vm_id: str, method: str) -> None:
    r = await api.client.request(method, f"/api/vms/{vm_id}", headers=api.auth("alice"))
    assert_error(r, 400, "invalid_id")


async def test_unknown_provider_is_400_and_creates_nothing(api: Api) -> None:
    r = await api.client.post(
        "/api/auth/start", json={"provider": "nosuch"}, headers=api.auth("alice")
    )
    error = assert_error(r, 400, "unknown_provider")
    assert "oauth2" in error["message"]  # says what is known
    assert await api.counts() == (0, 0)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"provider": 123}, "provider"),
        ({"provider": ["oauth2"]}, "provider"),
        ({"provider": "Bad-Provider"}, "provider"),
        ({"provider": ""}, "provider"),
        ({"provider": "a" * 65}, "provider"),
        ({}, "provider"),
        ({"provider": "oauth2", "userId": "bad name!"}, "userId"),
        ({"provider": "oauth2", "userId": 7}, "userId"),
        ({"provider": "oauth2", "cliVmId": "not-a-vm"}, "cliVmId"),
        ({"provider": "oauth2", "surprise": True}, "surprise"),
    ],
)
async def test_bad_start_bodies_are_422_naming_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    r = await api.client.post("/api/auth/start", json=body, headers=api.auth("alice"))
    error = assert_error(r, 422, "invalid_request")
    assert field in error["message"]
    assert await api.counts() == (0, 0)


@pytest.mark.parametrize("content", [b"{", b"not json", b"[]", b'"oauth2"', b"\xff\xfe"], ids=repr)
async def test_unparsable_bodies_are_422(api: Api, content: bytes) -> None:
    r = await api.client.post(
        "/api/auth/start",
        content=content,
        headers={**api.auth("alice"), "Content-Type": "application/json"},
    )
    assert_error(r, 422, "invalid_request")
    assert await api.counts() == (0, 0)


@pytest.mark.parametrize(
    "body", [{"role": "browser"}, {"role": "cli", "userId": ""}, {"role": "cli", "x": 1}]
)
async def test_bad_vm_bodies_are_422(api: Api, body: dict[str, Any]) -> None:
    r = await api.client.post("/api/vms", json=body, headers=api.auth("alice"))
    assert_error(r, 422, "invalid_request")
    assert await api.counts() == (0, 0)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/auth/sessions", {"status": "bogus"}),
        ("/api/auth/sessions", {"limit": "many"}),
        ("/api/auth/sessions", {"limit": "0"}),
        ("/api/vms", {"role": "robot"}),
        ("/api/vms", {"state": "sleeping"}),
    ],
)
async def test_bad_query_parameters_are_422(api: Api, path: str, params: dict[str, str]) -> None:
    r = await api.client.get(path, params=params, headers=api.auth("alice"))
    error = assert_error(r, 422, "invalid_request")
    assert next(iter(params)) in error["message"]


async def test_oversize_body_is_413(api: Api) -> None:
    big = {"provider": "oauth2", "pad": "x" * 70_000}
    r = await api.client.post("/api/auth/start", json=big, headers=api.auth("alice"))
    assert_error(r, 413, "body_too_large")

    async def chunks() -> Any:  # no Content-Length: counted as it streams in
        for _ in range(20):
            yield b"x" * 8192

    r = await api.client.post("/api/auth/start", content=chunks(), headers=api.auth("alice"))
    assert_error(r, 413, "body_too_large")
    assert await api.counts() == (0, 0)


async def test_complete_before_the_login_ended_is_409(api: Api) -> None:
    for status in (SessionStatus.INITIALIZING, SessionStatus.AWAITING_USER):
        state = VmState.CREATING if status is SessionStatus.INITIALIZING else VmState.RUNNING
        session, _ = await api.add_session("alice", status=status, vm_state=state)
        r = await api.client.post(
            f"/api/auth/session/{session.id}/complete", headers=api.auth("alice")
        )
        assert_error(r, 409, "session_not_finished")
        fresh, fresh_vm = await api.core.sessions.get(session.id, None)
        assert fresh.status == status.value
        assert fresh_vm is not None and fresh_vm.state == state.value
    assert api.runtime.destroyed == []


async def test_illegal_transition_is_409(api: Api) -> None:
    async def boom() -> None:
        raise IllegalTransition("vm", "destroyed", "running")

    api.app.add_api_route("/test/illegal", boom)
    assert_error(await api.client.get("/test/illegal"), 409, "conflict")


async def test_unexpected_errors_are_500_without_detail(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom() -> None:
        raise KeyError("secret-detail-7f3a")

    api.app.add_api_route("/test/boom", boom)
    r = await api.client.get("/test/boom")
    error = assert_error(r, 500, "internal")
    assert "secret-detail" not in r.text
    assert "KeyError" not in error["message"]
    assert any("secret-detail-7f3a" in (rec.exc_text or "") for rec in caplog.records) or any(
        rec.exc_info and "secret-detail-7f3a" in str(rec.exc_info[1]) for rec in caplog.records
    ), "the error is logged with its traceback"


async def test_unavailable_runtime_is_503_with_a_tombstone(api: Api) -> None:
    """Creating a CLI VM on a runtime that cannot boot one: 503 with the runtime's reason,
    and the VM row says what happened."""
    r = await api.client.post("/api/vms", json={"role": "cli"}, headers=api.auth("alice"))
    error = assert_error(r, 503, "runtime_failure")
    assert "no VMs in API tests" in error["message"]
    r = await api.client.get("/api/vms", params={"state": "destroyed"}, headers=api.auth("alice"))
    [vm] = r.json()
    assert vm["destroyReason"] == "boot_failed"
    assert vm["lastError"] == "no VMs in API tests"


async def test_curls_default_form_type_is_read_as_json(api: Api) -> None:
    """The issue's own check is `curl -X POST .../api/auth/start -d '{"provider":"oauth2"}'`,
    which sends application/x-www-form-urlencoded."""
    r = await api.client.post(
        "/api/auth/start",
        content=b'{"provider":"oauth2"}',
        headers={**api.auth("alice"), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 201, r.text
    assert {"sessionId", "status", "novncURL"} <= r.json().keys()


async def test_other_content_types_are_still_refused(api: Api) -> None:
    r = await api.client.post(
        "/api/auth/start",
        content=b'{"provider":"oauth2"}',
        headers={**api.auth("alice"), "Content-Type": "text/plain"},
    )
    assert_error(r, 422, "invalid_request")
    assert await api.counts() == (0, 0)
