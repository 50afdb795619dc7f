"""The fake runtime (``runtimes/fake.py``): its VMs are real state dirs and real processes, its
agent answers the real protocol; a crashed VM process is a lost VM to the reconciler."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.agent.client import AgentClient, AgentError
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmRole, VmState
from airlock.errors import RuntimeFailure
from airlock.providers.oauth2 import TOKENS_PATH
from airlock.runtimes.base import VmSpec
from airlock.runtimes.fake import IN_USE, FakeRuntime
from airlock.runtimes.vmdir import proc_stat, read_pid
from airlock.services.core import Core
from airlock.settings import Settings
from tests.lifecycle_helpers import finish_login, running_ids, token_response, wait_for
from tests.rfb import RfbClient, StreamTransport

AIRLOCK = Path(sys.executable).parent / "airlock"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[FakeRuntime]:
    rt = FakeRuntime(tmp_path / "vms")
    yield rt
    await rt.close()
    for vm in await rt.list():
        await rt.destroy(vm.vm_id)
    assert await rt.list() == []


def _pid(runtime: FakeRuntime, vm_id: str) -> int:
    record = read_pid(runtime.vms_dir / vm_id)
    assert record is not None
    return record.pid


def _alive(pid: int) -> bool:
    found = proc_stat(pid)
    return found is not None and found[0] not in ("Z", "X")


async def _agent(runtime: FakeRuntime, vm_id: str) -> AgentClient:
    return await runtime.agent_client(vm_id)  # connected, its hello answered


async def test_a_vm_is_a_state_dir_and_a_live_process(runtime: FakeRuntime) -> None:
    vm = await runtime.create(VmSpec("vm-a", VmRole.BROWSER, "alice"))
    assert vm.pid is not None and _alive(vm.pid)
    assert json.loads((vm.state_dir / "meta.json").read_text())["runtime"] == "fake"
    assert [(v.vm_id, v.pid) for v in await runtime.list()] == [("vm-a", vm.pid)]
    with pytest.raises(RuntimeFailure) as exists:
        await runtime.create(VmSpec("vm-a", VmRole.BROWSER, "alice"))
    assert exists.value.code == "vm_exists"
    assert await runtime.destroy("vm-a") is True
    assert not _alive(vm.pid) and not vm.state_dir.exists()
    assert await runtime.destroy("vm-a") is False  # idempotent
    assert await runtime.list() == []


async def test_the_agent_answers_ping_with_the_vm_role(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-b", VmRole.BROWSER, "alice", lease_ms=60_000))
    async with await _agent(runtime, "vm-b") as agent:
        assert agent.hello["role"] == "browser"
        ping = await agent.ping()
        assert ping["role"] == "browser" and ping["browser"] is True  # no browser to wait for
        assert 0 < ping["lease_ends_in_ms"] <= 60_000
        assert await agent.lease(120_000, 1_000) == 121_000
        with pytest.raises(AgentError) as bad:
            await agent.lease(-1)
        assert bad.value.code == "bad_request"


async def test_capture_is_what_the_login_wrote_and_ack_wipes_it(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-c", VmRole.BROWSER, "alice"))
    home = runtime.vms_dir / "vm-c" / "home"
    plan = {"provider": "oauth2", "argv": ["true"], "env": {}, "watch": [TOKENS_PATH]}
    async with await _agent(runtime, "vm-c") as agent:
        with pytest.raises(AgentError) as no_login:
            await agent.capture(timeout_s=0)
        assert no_login.value.code == "no_login"
        await agent.request("start_login", {"login": plan})
        assert (await agent.login_status())["state"] == "running"
        assert await agent.capture_files(timeout_s=0.2) is None

        async def login_finishes() -> None:
            await asyncio.sleep(0.1)
            await finish_login(runtime, "vm-c")

        finisher = asyncio.create_task(login_finishes())
        files = await agent.capture_files(timeout_s=30)  # woken by the write, not by a timer
        await finisher
        assert files is not None and json.loads(files[TOKENS_PATH])["refresh_token"]
        assert (await agent.login_status())["captured"] is True
        assert await agent.ack_capture() == [TOKENS_PATH]
        assert not (home / TOKENS_PATH).exists()
        assert await agent.ack_capture() == []


async def test_files_stay_in_the_vm_home_and_run_runs_there(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-d", VmRole.CLI, "alice"))
    home = runtime.vms_dir / "vm-d" / "home"
    outside = runtime.vms_dir.parent / "outside.json"
    async with await _agent(runtime, "vm-d") as agent:
        for path in (str(outside), "../outside.json", "a/../../../outside.json"):
            with pytest.raises(AgentError) as refused:
                await agent.write_files({path: b"{}"})
            assert refused.value.code == "bad_request", path
        assert not outside.exists()
        assert await agent.write_files({".tool/creds.json": b'{"k": 1}'}) == [".tool/creds.json"]
        assert (home / ".tool" / "creds.json").stat().st_mode & 0o777 == 0o600
        result = await agent.run(["/bin/sh", "-c", 'pwd; echo "$HOME"; cat .tool/creds.json'])
        assert result.exit_code == 0
        assert result.stdout.splitlines() == [str(home), str(home), '{"k": 1}']
        slow = await agent.run(["/bin/sleep", "30"], timeout_s=0.2)
        assert slow.timed_out and slow.exit_code is None
        with pytest.raises(AgentError) as missing:
            await agent.run(["/nonexistent/binary"])
        assert missing.value.code == "spawn_failed"
        with pytest.raises(AgentError) as no_lease:
            await agent.lease(60_000)
        assert no_lease.value.code == "no_lease"
        with pytest.raises(AgentError) as unknown:
            await agent.request("connect", {"port": 5900})
        assert unknown.value.code == "unknown_op"
        assert await agent.wipe([".tool/creds.json", "never-there"]) == [".tool/creds.json"]


async def test_a_wrong_secret_is_refused(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-e", VmRole.CLI, "alice"))
    state_dir = runtime.vms_dir / "vm-e"
    with pytest.raises(AgentError) as refused:
        await runtime._connect_agent(state_dir, "not-the-secret")
    assert refused.value.code == "unauthorized"


async def test_a_client_that_hangs_up_mid_capture_ends_the_connection(
    runtime: FakeRuntime,
) -> None:
    """The long poll must not outlive its client (the orphan-task guard checks it too)."""
    await runtime.create(VmSpec("vm-f", VmRole.BROWSER, "alice"))
    plan = {"provider": "oauth2", "argv": ["true"], "env": {}, "watch": [TOKENS_PATH]}
    agent = await _agent(runtime, "vm-f")
    await agent.request("start_login", {"login": plan})
    poll = asyncio.create_task(agent.capture(timeout_s=120))
    vm = runtime.vm("vm-f")
    await wait_for(lambda: _true(bool(vm.connections)))
    poll.cancel()
    await asyncio.gather(poll, return_exceptions=True)
    await agent.close()
    await wait_for(lambda: _true(not vm.connections), timeout=10)


async def _true(value: bool) -> bool:
    return value


async def test_destroy_hangs_up_its_agent_connections(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-g", VmRole.BROWSER, "alice"))
    plan = {"provider": "oauth2", "argv": ["true"], "env": {}, "watch": [TOKENS_PATH]}
    agent = await _agent(runtime, "vm-g")
    await agent.request("start_login", {"login": plan})
    poll = asyncio.create_task(agent.capture(timeout_s=120))
    await asyncio.sleep(0.05)
    await runtime.destroy("vm-g")
    with pytest.raises(AgentError) as closed:
        await asyncio.wait_for(poll, 10)
    assert closed.value.code == "closed"
    with pytest.raises(RuntimeFailure):
        await runtime.open_agent("vm-g")


async def test_a_restarted_controller_adopts_its_vms(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-h", VmRole.BROWSER, "alice"))
    plan = {"provider": "oauth2", "argv": ["true"], "env": {}, "watch": [TOKENS_PATH]}
    async with await _agent(runtime, "vm-h") as agent:
        await agent.request("start_login", {"login": plan})
    pid = _pid(runtime, "vm-h")
    restarted = FakeRuntime(runtime.vms_dir)  # a new controller process's runtime
    assert [(v.vm_id, v.pid) for v in await restarted.list()] == [("vm-h", pid)]
    await finish_login(restarted, "vm-h", token_response())
    async with await _agent(restarted, "vm-h") as agent:  # the same secret, the same login
        files = await agent.capture_files(timeout_s=10)
    assert files is not None and TOKENS_PATH in files
    await restarted.close()


async def test_a_crashed_vm_process_is_gone_from_the_listing(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-i", VmRole.CLI, "alice"))
    await runtime.create(VmSpec("vm-j", VmRole.CLI, "alice"))
    os.kill(_pid(runtime, "vm-i"), signal.SIGKILL)
    await wait_for(lambda: _listed_without(runtime, "vm-i"), timeout=10)
    assert await running_ids(runtime) == {"vm-j"}
    assert not (runtime.vms_dir / "vm-i").exists()  # cleaned up after, as any runtime does
    with pytest.raises(RuntimeFailure):
        await runtime.open_agent("vm-i")


async def _listed_without(runtime: FakeRuntime, vm_id: str) -> bool:
    return vm_id not in await running_ids(runtime)


async def test_an_unrenewed_lease_ends_the_vm(runtime: FakeRuntime) -> None:
    vm = await runtime.create(VmSpec("vm-k", VmRole.BROWSER, "alice", lease_ms=300))
    assert vm.pid is not None
    async with await _agent(runtime, "vm-k") as agent:
        assert 0 < (await agent.ping())["lease_ends_in_ms"] <= 300
    await wait_for(lambda: _listed_without(runtime, "vm-k"), timeout=10)
    assert not _alive(vm.pid)


async def test_check_says_the_fake_runtime_is_in_use(runtime: FakeRuntime) -> None:
    assert await runtime.check() == [IN_USE]


def test_doctor_says_the_fake_runtime_is_in_use(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AIRLOCK_")}
    env.update(AIRLOCK_DATA_DIR=str(tmp_path / "data"), AIRLOCK_RUNTIME="fake")
    result = subprocess.run(
        [str(AIRLOCK), "doctor", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["runtime"] == "fake" and report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["runtime fake"]["ok"] is False
    assert "fake runtime is in use" in checks["runtime fake"]["detail"]
    # What only the sandbox needs is not required of it.
    assert checks["bwrap"]["required"] is False and checks["cgroups"]["required"] is False


# --- the reconciler -----------------------------------------------------------------------


@pytest.fixture
async def fake_core(db_url: str, tmp_path: Path) -> AsyncIterator[Core]:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        database_url=db_url,
        demo_idp_port=4999,
        runtime="fake",
        reconcile_interval_ms=300,
        login_timeout_ms=600_000,
    )
    core = Core(settings, demo=True)
    await core.start()
    try:
        yield core
    finally:
        await core.close()
        assert isinstance(core.runtime, FakeRuntime)
        await core.runtime.close()
        leftover = FakeRuntime(settings.vms_dir)
        for vm in await leftover.list():
            await leftover.destroy(vm.vm_id)


async def test_a_crashed_vm_is_lost_to_the_reconciler(fake_core: Core) -> None:
    core = fake_core
    runtime = core.runtime
    assert isinstance(runtime, FakeRuntime)
    sessions = []
    for user in ("alice", "bob"):
        session, vm = await core.sessions.start(user_id=user, provider_id="oauth2", actor="test")
        sessions.append((session.id, vm.id))

    async def ready() -> bool:
        for session_id, _ in sessions:
            session, _ = await core.sessions.get(session_id, None)
            if session.status != SessionStatus.AWAITING_USER.value:
                return False
        return True

    await wait_for(ready, timeout=30)
    (lost_session, lost_vm), (kept_session, kept_vm) = sessions
    os.kill(_pid(runtime, lost_vm), signal.SIGKILL)

    async def lost() -> bool:
        return (await core.vms.get(lost_vm, None)).state == VmState.LOST.value

    await wait_for(lost, timeout=30)
    session, _ = await core.sessions.get(lost_session, None)
    assert session.status == SessionStatus.FAILED.value
    assert session.failure_reason is not None
    assert session.failure_reason.startswith("vm_lost: the browser VM stopped unexpectedly")
    premature = core.metrics.registry.get_sample_value(
        "airlock_premature_vm_destructions_total", {}
    )
    assert premature is not None and premature >= 1
    # The other session's VM was not touched.
    other, _ = await core.sessions.get(kept_session, None)
    assert other.status == SessionStatus.AWAITING_USER.value
    assert (await core.vms.get(kept_vm, None)).state == VmState.RUNNING.value
    assert kept_vm in await running_ids(runtime)


# --- the screen ---------------------------------------------------------------------------


async def test_the_screen_speaks_rfb_and_remembers_keys(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-s", VmRole.BROWSER, "alice", screen=(320, 240)))
    client = RfbClient(StreamTransport(*await runtime.open_vnc("vm-s")))
    init = await client.handshake()
    assert (init.width, init.height, init.bpp) == (320, 240, 32)
    await client.true_colour()
    shot = await client.screenshot()
    assert shot.share((0x44, 0x44, 0x44), tolerance=0) == 1.0
    for keysym in b"hi":
        await client.key(keysym)
    await wait_for(lambda: _true(list(runtime.vm("vm-s").keys) == [ord("h"), ord("i")]))
    await client.close()


async def test_the_screen_hangs_up_on_what_is_not_rfb(runtime: FakeRuntime) -> None:
    await runtime.create(VmSpec("vm-t", VmRole.BROWSER, "alice"))
    reader, writer = await runtime.open_vnc("vm-t")
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing more said
    writer.close()
    await runtime.destroy("vm-t")
    with pytest.raises(RuntimeFailure):
        await runtime.open_vnc("vm-t")
