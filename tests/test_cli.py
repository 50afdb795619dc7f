"""The ``airlock`` command, run for real (the installed console script) as a subprocess on a
data dir in ``tmp_path``: results alone on standard output, everything else on standard
error, bad input refused with a clear message and nothing changed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.clock import Clock
from airlock.services.tokens import TokenService
from airlock.store.db import Database
from airlock.store.tables import AuthSession, Vm
from tests.lifecycle_helpers import wait_for_blocking

AIRLOCK = Path(sys.executable).parent / "airlock"


class Cli:
    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.cwd = tmp_path  # no .env of the checkout is read
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AIRLOCK_")}
        env.pop("BROWSER_VM_GRACE_PERIOD_MS", None)
        env["AIRLOCK_DATA_DIR"] = str(self.data_dir)
        env["COLUMNS"] = "200"  # Rich tables: no wrapping of ids
        self.env = env

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(AIRLOCK), *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if ok:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    assert AIRLOCK.exists(), f"the console script {AIRLOCK} is not installed (pip install -e .)"
    return Cli(tmp_path)


def authenticate(cli: Cli, value: str) -> tuple[str, str]:
    async def run() -> tuple[str, str]:
        db = Database(f"sqlite+aiosqlite:///{cli.data_dir / 'airlock.db'}")
        try:
            principal = await TokenService(db, Clock()).authenticate(value)
            return principal.kind, principal.subject
        finally:
            await db.close()

    return asyncio.run(run())


def test_tokens_create_prints_the_token_alone(cli: Cli) -> None:
    result = cli("tokens", "create", "--user", "alice")
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("alk_"), result.stdout
    assert lines[0] not in result.stderr
    assert "alice" in result.stderr
    assert authenticate(cli, lines[0]) == ("user", "alice")
    service = cli("tokens", "create", "--service", "web-backend").stdout.strip()
    assert authenticate(cli, service) == ("service", "web-backend")


def test_tokens_list_and_revoke(cli: Cli) -> None:
    value = cli("tokens", "create", "--user", "alice").stdout.strip()
    [token] = cli.json("tokens", "list")
    assert set(token) == {"id", "kind", "subject", "createdAt", "revokedAt"}
    assert (token["kind"], token["subject"], token["revokedAt"]) == ("user", "alice", None)
    table = cli("tokens", "list")
    assert token["id"] in table.stdout and value not in table.stdout
    revoked = cli("tokens", "revoke", token["id"])
    assert token["id"] in revoked.stderr and revoked.stdout == ""
    [after] = cli.json("tokens", "list")
    assert after["revokedAt"] is not None
    cli("tokens", "revoke", token["id"])  # idempotent
    missing = cli("tokens", "revoke", "nosuchid", ok=False)
    assert missing.returncode == 1
    assert "no token" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --user NAME or --service NAME"),
        (("--user", "a", "--service", "b"), "exactly one of --user NAME or --service NAME"),
        (("--user", "bad name!"), "invalid user id"),
        (("--service", ""), "invalid service name"),
    ],
)
def test_tokens_create_refuses_bad_input_and_changes_nothing(
    cli: Cli, args: tuple[str, ...], message: str
) -> None:
    result = cli("tokens", "create", *args, ok=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert not cli.data_dir.exists()  # not even a database was made


def test_listings_are_empty_on_a_new_controller(cli: Cli) -> None:
    assert cli.json("vms", "ls") == []
    assert cli.json("vms", "ls", "--all") == []
    assert cli.json("sessions", "ls") == []
    assert cli.json("sessions", "ls", "--all") == []
    table = cli("vms", "ls")
    assert "no live VMs" in table.stderr


def test_reap_dry_run_on_an_empty_runtime(cli: Cli) -> None:
    report = cli.json("reap", "--dry-run")
    assert report == {"dryRun": True, "running": 0, "actions": []}


def test_doctor_reports_checks(cli: Cli) -> None:
    result = cli("doctor", "--json", ok=False)
    report = json.loads(result.stdout)
    names = {c["name"] for c in report["checks"]}
    assert {"bwrap", "Xvnc", "chromium", "pasta", "qemu-system-x86_64", "kvm"} <= names
    assert {"data dir", "database", "runtime sandbox"} <= names
    for check in report["checks"]:
        assert set(check) == {"name", "ok", "required", "detail", "fix"}
        if not check["ok"] and check["name"] in {"bwrap", "Xvnc", "chromium"}:
            assert check["fix"].startswith("apt-get install")
    failed = [c for c in report["checks"] if c["required"] and not c["ok"]]
    assert report["ok"] is (not failed)
    assert result.returncode == (1 if failed else 0)


def test_doctor_checks_what_contains_a_sandbox_vm(cli: Cli) -> None:
    report = json.loads(cli("doctor", "--json", ok=False).stdout)
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("controller uid", "user namespaces", "seccomp", "cgroups"):
        assert checks[name]["required"] is True  # the default runtime is the sandbox
        assert checks[name]["ok"] or checks[name]["fix"], checks[name]
    if os.geteuid() == 0:  # this host (CI) runs the controller as root, on cgroup v1 or v2
        assert checks["controller uid"]["ok"] and checks["cgroups"]["ok"], checks
        detail = checks["cgroups"]["detail"]
        assert re.search(r"cgroup v[12]: VM leaves under /sys/fs/cgroup", detail), detail
    assert checks["user namespaces"]["ok"], checks["user namespaces"]


def test_a_host_without_user_namespaces_is_told_how_to_fix_it() -> None:
    from airlock.runtimes.confine import userns_problem

    assert userns_problem("/bin/false") == "exit 1"  # what a bwrap that cannot says
    assert userns_problem("/usr/bin/bwrap") is None


def test_doctor_fails_for_a_runtime_that_is_not_built(cli: Cli) -> None:
    cli.env["AIRLOCK_RUNTIME"] = "firecracker"
    result = cli("doctor", "--json", ok=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    runtime = next(c for c in report["checks"] if c["name"] == "runtime firecracker")
    assert runtime["ok"] is False and runtime["required"] is True


def test_invalid_settings_are_a_clear_error(cli: Cli) -> None:
    cli.env["AIRLOCK_PORT"] = "not-a-port"
    result = cli("vms", "ls", ok=False)
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "port" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_demo_prints_a_token_serves_the_api_and_the_idp(cli: Cli) -> None:
    first = _serve_demo(cli)
    # A second start prints a new token and revokes the first: one demo token at a time,
    # however often the demo is started.
    second = _serve_demo(cli)
    assert second != first
    demo = [t for t in cli.json("tokens", "list") if t["subject"] == "demo"]
    assert len(demo) == 2
    assert sum(1 for t in demo if t["revokedAt"] is None) == 1


def _serve_demo(cli: Cli) -> str:
    """Run ``serve --demo`` until its API and IdP answer; stop it; return its token."""
    port, idp_port = _free_port(), _free_port()
    cli.env["AIRLOCK_DEMO_IDP_PORT"] = str(idp_port)
    cli.env["AIRLOCK_LOG_JSON"] = "true"
    proc = subprocess.Popen(
        [str(AIRLOCK), "serve", "--demo", "--port", str(port)],
        cwd=cli.cwd,
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        token = None
        deadline = time.monotonic() + 30
        while token is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "serve exited before printing the token"
            if "Dashboard token for user demo:" in line:
                token = line.split(":", 1)[1].strip()
        assert token is not None and token.startswith("alk_")
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for_blocking(ready, timeout=30, interval=0.1)
        r = httpx.get(f"{base}/api/providers", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        providers = {p["id"]: p for p in r.json()}
        assert providers["oauth2"]["available"] is True
        assert {"claude_code", "codex", "gemini_cli"} <= set(providers)
        # Which Google accounts can sign in to Gemini CLI is said where people choose.
        assert "Code Assist" in providers["gemini_cli"]["accounts"]
        assert "Individual accounts" in providers["gemini_cli"]["accounts"]
        assert "accounts" not in providers["oauth2"]
        idp = httpx.get(f"http://127.0.0.1:{idp_port}/.well-known/oauth-authorization-server")
        assert idp.status_code == 200
        assert idp.json()["issuer"] == f"http://idp.airlock.test:{idp_port}"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    # uvicorn re-raises the SIGINT it handled once shut down: 130 is "stopped by Ctrl-C".
    assert proc.returncode in (0, 130), err[-2000:]
    assert "Application shutdown complete" in err
    assert "Traceback" not in err
    assert token not in err  # printed once, above, and never logged
    return token


def test_vms_and_sessions_ls_show_what_runs(cli: Cli) -> None:
    cli("tokens", "create", "--user", "alice")  # makes the database
    now = datetime.now(UTC)

    async def write() -> None:
        # Rows of this host, as the CLI's controller would write them (AIRLOCK_NODE_NAME).
        db = Database(
            f"sqlite+aiosqlite:///{cli.data_dir / 'airlock.db'}", node=socket.gethostname()
        )
        try:
            async with db.transaction() as repo:
                for vm_id, state, after in (
                    ("vm-live1", "running", now + timedelta(minutes=50)),
                    ("vm-gone1", "destroyed", None),
                ):
                    repo.add_vm(
                        Vm(
                            id=vm_id,
                            role="browser",
                            runtime="sandbox",
                            user_id="alice",
                            state=state,
                            created_at=now,
                            updated_at=now,
                            destroy_after=after,
                            destroy_attempts=0,
                            warm=False,
                            detail={},
                        )
                    )
                await repo.session.flush()
                repo.add_session(
                    AuthSession(
                        id="a" * 32,
                        user_id="alice",
                        provider="oauth2",
                        status="awaiting_user",
                        vm_id="vm-live1",
                        created_at=now,
                        updated_at=now,
                    )
                )
        finally:
            await db.close()

    asyncio.run(write())
    [live] = cli.json("vms", "ls")
    assert (live["vmId"], live["state"], live["userId"]) == ("vm-live1", "running", "alice")
    assert live["destroyAfter"].endswith("Z")
    assert {v["vmId"] for v in cli.json("vms", "ls", "--all")} == {"vm-live1", "vm-gone1"}
    table = cli("vms", "ls").stdout
    assert "vm-live1" in table and "vm-gone1" not in table
    assert re.search(r"in (49|50) min", table), table  # robust to a slow CLI start
    [session] = cli.json("sessions", "ls")
    assert session["sessionId"] == "a" * 32 and session["vm"]["vmId"] == "vm-live1"
    assert "a" * 32 in cli("sessions", "ls").stdout
    report = cli.json("reap", "--dry-run")
    # vm-live1 is a row whose VM the sandbox runtime does not run: the reconciler would
    # call it lost (it vanished before its deadline); a dry run only says so.
    assert report["actions"] == [
        {"action": "mark_lost", "vmId": "vm-live1", "expectedState": "running"}
    ]
    assert cli.json("vms", "ls")[0]["state"] == "running"
    applied = cli.json("reap")
    assert applied["dryRun"] is False and len(applied["actions"]) == 1
    assert cli.json("vms", "ls") == []
    [session] = cli.json("sessions", "ls", "--all")
    assert session["status"] == "failed" and session["vm"]["state"] == "lost"
