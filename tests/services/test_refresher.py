"""The ``oauth2`` refresher in a real CLI VM (sandbox) against the real demo IdP.

The CLI VM has no network but loopback; the refresher reaches the token endpoint the way a
vendor CLI in that VM does: ``HTTPS_PROXY``/``HTTP_PROXY`` at ``127.0.0.1:3128``, which the
guest agent carries to the controller's egress proxy for that VM (the CLI VM policy), which
sends ``idp.airlock.test`` to the IdP's loopback port.
"""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.agent.client import AgentClient
from airlock.providers.oauth2 import TOKENS_PATH, OAuth2Provider
from airlock.services.core import Core
from tests.idp_live import LiveIdp, grant_of, live_idp
from tests.services.conftest import CoreFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


@pytest.fixture
def idp() -> Iterator[LiveIdp]:
    with live_idp(refresh_ttl=3 * 24 * 3600) as server:
        yield server


async def run_in(core: Core, vm_id: str, argv: list[str]) -> tuple[int | None, dict[str, object]]:
    agent = AgentClient(*await core.runtime.open_agent(vm_id))
    try:
        result = await agent.run(argv, timeout_s=60)
    finally:
        await agent.close()
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output (exit {result.exit_code}): {result.stderr[-2000:]}"
    report: dict[str, object] = json.loads(lines[-1])
    return result.exit_code, report


async def put_tokens(core: Core, vm_id: str, content: bytes) -> None:
    agent = AgentClient(*await core.runtime.open_agent(vm_id))
    try:
        await agent.write_files({TOKENS_PATH: content})
    finally:
        await agent.close()


def home(core: Core, vm_id: str) -> Path:
    return core.settings.vms_dir / vm_id / "home"


async def test_the_refresher_rotates_the_file_in_the_vm_and_the_idp_counts_it(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port)
    provider = core.providers["oauth2"]
    assert isinstance(provider, OAuth2Provider)
    cli = await core.vms.create_cli(user_id="alice", actor="test")
    first = idp.sign_in()
    grant = grant_of(first)
    await put_tokens(core, cli.id, json.dumps(first).encode())
    path = home(core, cli.id) / TOKENS_PATH

    # Fresh enough: a CLI does not refresh yet.
    code, report = await run_in(core, cli.id, provider.refresh_argv(min_valid_s=60))
    assert (code, report["result"]) == (0, "fresh"), report
    assert idp.grants()[grant]["refreshesAccepted"] == 0

    seen = [first["refresh_token"]]
    for n in (1, 2):
        code, report = await run_in(core, cli.id, provider.refresh_argv())
        assert (code, report["result"], report["rotated"]) == (0, "refreshed", True), report
        data = json.loads(path.read_bytes())
        assert data["refresh_token"] not in seen
        seen.append(data["refresh_token"])
        assert data["expires_at"] == data["obtained_at"] + 3600
        assert data["refresh_expires_at"] == data["obtained_at"] + 3 * 24 * 3600
        assert report["refreshExpiresAt"] == data["refresh_expires_at"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert idp.grants()[grant]["refreshesAccepted"] == n
        for token in seen:  # no token in what the refresher prints
            assert token not in json.dumps(report)
    assert idp.grants()[grant]["reusedRefreshTokens"] == 0

    # The check asks without using the token up.
    check = provider.status_check()
    assert check is not None
    code, report = await run_in(core, cli.id, check.argv)
    assert (code, report["result"]) == (0, "active"), report
    assert idp.grants()[grant]["refreshesAccepted"] == 2
    assert json.loads(path.read_bytes())["refresh_token"] == seen[-1]


async def test_a_revoked_login_is_told_by_the_check_and_by_the_refresh(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port)
    provider = core.providers["oauth2"]
    assert isinstance(provider, OAuth2Provider)
    check = provider.status_check()
    assert check is not None
    cli = await core.vms.create_cli(user_id="alice", actor="test")
    tokens = idp.sign_in()
    await put_tokens(core, cli.id, json.dumps(tokens).encode())
    idp.revoke(grant_of(tokens))

    code, report = await run_in(core, cli.id, check.argv)
    assert (code, report["result"]) == (4, "revoked"), report
    before = (home(core, cli.id) / TOKENS_PATH).read_bytes()
    code, report = await run_in(core, cli.id, provider.refresh_argv())
    assert (code, report["result"]) == (4, "revoked"), report
    assert "invalid_grant" in str(report["message"])
    assert (home(core, cli.id) / TOKENS_PATH).read_bytes() == before  # left as it was


async def test_no_token_file_is_no_login_and_an_unreachable_idp_is_a_failure(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port)
    provider = core.providers["oauth2"]
    assert isinstance(provider, OAuth2Provider)
    cli = await core.vms.create_cli(user_id="alice", actor="test")
    code, report = await run_in(core, cli.id, provider.refresh_argv())
    assert (code, report["result"]) == (5, "no_login"), report
    # A token URL the CLI VM's egress policy does not allow: the proxy refuses it.
    await put_tokens(core, cli.id, json.dumps(idp.sign_in()).encode())
    elsewhere = OAuth2Provider(
        authorize_url="http://elsewhere.example:80/authorize",
        token_url="http://elsewhere.example:80/token",
        client_id="airlock-demo",
    )
    code, report = await run_in(core, cli.id, elsewhere.refresh_argv())
    assert code == 1 and report["result"] in ("failed", "unreachable"), report


async def test_refreshers_racing_in_one_vm_take_turns_and_reuse_nothing(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port)
    provider = core.providers["oauth2"]
    assert isinstance(provider, OAuth2Provider)
    cli = await core.vms.create_cli(user_id="alice", actor="test")
    tokens = idp.sign_in()
    await put_tokens(core, cli.id, json.dumps(tokens).encode())
    results = await asyncio.gather(
        *(run_in(core, cli.id, provider.refresh_argv()) for _ in range(5))
    )
    assert [(code, report["result"]) for code, report in results] == [(0, "refreshed")] * 5
    counters = idp.grants()[grant_of(tokens)]
    assert counters["refreshesAccepted"] == 5
    assert counters["reusedRefreshTokens"] == 0 and counters["revoked"] is False
