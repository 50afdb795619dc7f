"""The security review's small findings (issue 11), each attacked from outside: junk ids
and tokens, a Unicode digit, a trailing newline, a long token at the WebSocket, a string
for a boolean, cached answers, file modes, and a key rotation a running controller must
see. Each fix is at its cause; these prove it from the caller's side."""

from __future__ import annotations

import secrets
import stat
from datetime import UTC, datetime

import httpx
import pytest

from airlock.api.deps import ViewerSigner
from airlock.cli import DEMO_TOKEN_ACTOR
from airlock.clock import Clock
from airlock.services.keys import rotate
from airlock.vault import Vault
from tests.api.conftest import Api, ApiFactory
from tests.api.live import serve
from tests.api.test_errors import assert_error
from tests.api.test_viewer_tokens import _ws_refusal
from tests.lifecycle_helpers import wait_for

VIEWER_ROUTES = [
    ("GET", "/novnc"),
    ("GET", "/viewer/events"),
    ("POST", "/viewer/keepalive"),
    ("POST", "/viewer/complete"),
]


async def test_long_random_ids_on_viewer_events_leave_the_bus_empty(api: Api) -> None:
    """The medium finding: 200 GETs of .../<random 60 KiB id>/viewer/events kept 11.5 MB
    in the bus. Now the id is refused by its pattern, the token is checked before the bus
    is touched, and the bus keeps nothing for a session nobody waits on."""
    for i in range(200):
        junk = secrets.token_hex(30 * 1024) if i % 2 else secrets.token_hex(16)  # 60 KiB, or
        r = await api.client.get(  # a well-formed id of no session
            f"/api/auth/session/{junk}/viewer/events", params={"token": "1.f." + "A" * 43}
        )
        assert r.status_code in (400, 401), r.text
        assert_error(r, r.status_code, "invalid_id" if i % 2 else "invalid_viewer_token")
    assert len(api.core.bus) == 0
    # The authenticated stream too: a malformed id is 400 before anything.
    r = await api.client.get(f"/api/auth/session/{'f' * 60_000}/events", headers=api.auth("alice"))
    assert_error(r, 400, "invalid_id")
    assert len(api.core.bus) == 0


async def test_streams_that_end_leave_the_bus_empty(api: Api) -> None:
    """A watcher that leaves (the page closed, or the VM gone) takes the session's entry
    with it. Over a real server: the in-process transport buffers a whole stream."""
    session, vm = await api.add_session("alice")
    other, _ = await api.add_session("alice")
    signer = api.app.state.viewer_signer
    token = signer.mint(session.id, vm.id, now=datetime.now(UTC))

    async def first_event(client: httpx.AsyncClient, path: str, **kw: object) -> None:
        async with client.stream("GET", path, **kw) as r:  # type: ignore[arg-type]
            assert r.status_code == 200
            assert r.headers["cache-control"] == "no-store"
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    # Leave once the stream waits on the bus (not in the middle of a read):
                    # the page closes while nothing changes.
                    await wait_for(lambda: _watched(api))
                    return  # and the connection closes

    async def empty() -> bool:
        return len(api.core.bus) == 0

    async with serve(api.app, lifespan=False) as url, httpx.AsyncClient(base_url=url) as c:
        for _ in range(5):
            await first_event(
                c, f"/api/auth/session/{session.id}/viewer/events", params={"token": token}
            )
            await first_event(c, f"/api/auth/session/{other.id}/events", headers=api.auth("alice"))
        await wait_for(empty)
        # A stream that ends because its VM is gone leaves nothing either.
        async with c.stream(
            "GET", f"/api/auth/session/{other.id}/events", headers=api.auth("alice")
        ) as r:
            await wait_for(lambda: _watched(api))
            cancel = await c.delete(f"/api/auth/session/{other.id}", headers=api.auth("alice"))
            assert cancel.status_code == 200
            async for _ in r.aiter_lines():
                pass  # to the end the server gives it
        await wait_for(empty)


async def _watched(api: Api) -> bool:
    """One session watched, and its stream parked on the bus: not in the middle of a read,
    which a client that leaves would cut (a stream subscribes for its whole life, so the
    entry alone does not say it waits)."""
    return len(api.core.bus) == 1 and api.core.bus.parked() == 1


@pytest.mark.parametrize(("method", "suffix"), VIEWER_ROUTES)
async def test_a_unicode_digit_in_a_viewer_token_is_401(api: Api, method: str, suffix: str) -> None:
    session, _ = await api.add_session("alice")
    for token in ("²²²².f." + "A" * 43, "١٢٣.f." + "A" * 43, "1\n.f." + "A" * 43):
        r = await api.client.request(
            method, f"/api/auth/session/{session.id}{suffix}", params={"token": token}
        )
        assert r.status_code == 401, r.text
        if suffix != "/novnc":  # the page answers in HTML, with the status
            assert_error(r, 401, "invalid_viewer_token")


async def test_the_vnc_socket_refuses_junk_with_4401_never_a_handshake_error(
    api: Api,
) -> None:
    session, _ = await api.add_session("alice")
    invalid = (4401, "invalid_viewer_token")
    async with serve(api.app, lifespan=False) as url:
        base = "ws" + url.removeprefix("http") + "/api/auth/session/{}/vnc"
        for token in ("²²²².f." + "A" * 43, "1." * 200 + "f", "x" * 257, "9" * 4000):
            assert await _ws_refusal(base.format(session.id) + f"?token={token}") == invalid
        for bad_id in ("x" * 2000, "G" * 32, "0" * 31):
            assert await _ws_refusal(base.format(bad_id) + "?token=1.f." + "A" * 43) == invalid


@pytest.mark.parametrize("user_id", ["alice\n", "alice\r\n", "\nalice", "al ice", "ålice"])
async def test_user_ids_are_matched_whole(api: Api, user_id: str) -> None:
    r = await api.client.post(
        "/api/auth/start",
        json={"provider": "oauth2", "userId": user_id},
        headers=api.auth("service"),
    )
    assert_error(r, 422, "invalid_request")
    r = await api.client.get(
        "/api/auth/sessions", params={"userId": user_id}, headers=api.auth("service")
    )
    assert_error(r, 422, "invalid_request")
    with pytest.raises(Exception, match="invalid user id"):
        await api.core.tokens.create("user", user_id)
    assert await api.counts() == (0, 0)


@pytest.mark.parametrize("value", ["yes", "true", 1, "1", "on", None])
async def test_view_only_must_be_a_json_boolean(api: Api, value: object) -> None:
    session, _ = await api.add_session("alice")
    r = await api.client.post(
        f"/api/auth/session/{session.id}/viewer-token",
        json={"viewOnly": value},
        headers=api.auth("alice"),
    )
    assert_error(r, 422, "invalid_request")


async def test_answers_that_carry_viewer_tokens_are_never_cached(api: Api) -> None:
    session, _ = await api.add_session("alice")
    auth = api.auth("alice")
    answers = [
        await api.client.get(f"/api/auth/session/{session.id}", headers=auth),
        await api.client.get("/api/auth/sessions", headers=auth),
        await api.client.post(f"/api/auth/session/{session.id}/viewer-token", headers=auth),
        await api.client.get("/api/vms", headers=auth),
        await api.client.get("/api/auth/session/" + "0" * 32, headers=auth),  # an error too
    ]
    assert "token=" in answers[0].json()["novncURL"]
    for r in answers:
        assert r.headers["cache-control"] == "no-store", r.request.url


async def test_the_database_and_its_folder_are_private(make_api: ApiFactory) -> None:
    api = await make_api(database_url=None)  # the default: SQLite in the data dir
    data_dir = api.core.settings.data_dir
    await api.add_session("alice")  # something written: the WAL files exist too
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = list(data_dir.glob("airlock.db*"))
    assert data_dir / "airlock.db" in files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


async def test_a_vault_rotation_reaches_the_running_viewer_signer(api: Api) -> None:
    """``airlock vault rotate`` runs in another process, on the same key file: the running
    controller signs with the new key and refuses tokens of a dropped key at once."""
    session, vm = await api.add_session("alice")
    signer = api.app.state.viewer_signer
    before = signer.mint(session.id, vm.id, now=datetime.now(UTC))
    path = f"/api/auth/session/{session.id}/viewer/keepalive"
    assert (await api.client.post(path, params={"token": before})).status_code == 200
    other_process = Vault.open(api.core.settings.key_file)  # as the CLI opens it
    report = await rotate(api.core.db, other_process, Clock())
    assert report.dropped  # the old key is gone from the file
    r = await api.client.post(path, params={"token": before})
    assert_error(r, 401, "invalid_viewer_token")
    # A token the running controller mints now verifies under the rotated file alone.
    after = (
        await api.client.post(
            f"/api/auth/session/{session.id}/viewer-token", headers=api.auth("alice")
        )
    ).json()["token"]
    fresh = ViewerSigner.from_vault(Vault.open(api.core.settings.key_file), signer.ttl)
    assert fresh.verify(after, session.id, vm.id, now=datetime.now(UTC)).vm_id == vm.id
    assert (await api.client.post(path, params={"token": after})).status_code == 200


async def test_serve_demo_keeps_one_demo_token(api: Api) -> None:
    """What ``serve --demo`` does at each start (``cli.DEMO_TOKEN_ACTOR``): the token of
    the last start works, the earlier ones are revoked, other tokens are untouched."""
    first = await api.core.tokens.rotate("user", "demo", actor=DEMO_TOKEN_ACTOR)
    second = await api.core.tokens.rotate("user", "demo", actor=DEMO_TOKEN_ACTOR)
    own = await api.core.tokens.create("user", "demo")  # made with `airlock tokens create`

    def bearer(value: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {value}"}

    r = await api.client.get("/api/providers", headers=bearer(first.value))
    assert_error(r, 401, "unauthorized")
    for value in (second.value, own.value):
        assert (await api.client.get("/api/providers", headers=bearer(value))).status_code == 200
