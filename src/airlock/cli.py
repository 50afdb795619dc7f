"""The ``airlock`` command: run the controller, manage tokens, look at sessions and VMs,
reap, and check the host.

Thin: parse, call a service through ``Core`` (``open()`` for database-only commands, so no
loops run), print. Tables (Rich) by default, ``--json`` for scripts. Results go to standard
output; everything else (notes, errors, logs) to standard error, so ``TOKEN=$(airlock
tokens create --user alice)`` captures the token alone. Every command reads the same
``Settings`` as the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from airlock import cli_credentials
from airlock.api import schemas
from airlock.domain.sessions import SessionStatus
from airlock.errors import AirlockError
from airlock.services.core import Core, make_runtime
from airlock.services.egress import suggest as egress_suggestion
from airlock.services.tokens import check_name
from airlock.settings import Settings
from airlock.store.db import Database
from airlock.store.tables import AuthSession, Token, Vm

T = TypeVar("T")

app = typer.Typer(
    name="airlock",
    help="Airlock: browser-VM logins for per-user AI-coding microVMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEMO_TOKEN_ACTOR = "serve --demo"
tokens_app = typer.Typer(help="API tokens (stored hashed; shown once).", no_args_is_help=True)
sessions_app = typer.Typer(help="Auth sessions.", no_args_is_help=True)
vms_app = typer.Typer(help="Browser VMs and CLI VMs.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
app.add_typer(sessions_app, name="sessions")
app.add_typer(vms_app, name="vms")
vault_app = typer.Typer(help="The credentials key file.", no_args_is_help=True)
app.add_typer(vault_app, name="vault")
image_app = typer.Typer(help="Guest images for the qemu and firecracker runtimes.")
app.add_typer(image_app, name="image")
egress_app = typer.Typer(help="The browser VMs' egress policy.", no_args_is_help=True)
app.add_typer(egress_app, name="egress")
app.add_typer(cli_credentials.app, name="credentials")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def main() -> None:
    app()


# --- plumbing -----------------------------------------------------------------------------
def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        _fail(f"invalid settings (AIRLOCK_* environment or .env): {problems}", 2)


def _with_core(settings: Settings, action: Callable[[Core], Awaitable[T]]) -> T:
    """Open the database (and vault) only, run ``action``, close. Service errors become a
    message and exit status 1."""

    async def run() -> T:
        core = Core(settings)
        try:
            await core.open()
            return await action(core)
        finally:
            await core.close()

    try:
        return asyncio.run(run())
    except AirlockError as exc:
        _fail(exc.message)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _iso(value: datetime | None) -> str | None:
    return schemas.iso(value) if value is not None else None


def relative(value: datetime | None, now: datetime) -> str:
    """``in 25 s``, ``3 min ago``, ``-`` for none."""
    if value is None:
        return "-"
    seconds = (value - now).total_seconds()
    span = abs(seconds)
    if span < 1:
        return "now"
    if span < 120:
        text = f"{span:.0f} s"
    elif span < 7200:
        text = f"{span / 60:.0f} min"
    elif span < 172_800:
        text = f"{span / 3600:.0f} h"
    else:
        text = f"{span / 86400:.0f} d"
    return f"in {text}" if seconds > 0 else f"{text} ago"


# --- serve --------------------------------------------------------------------------------
@app.command()
def serve(
    demo: Annotated[
        bool,
        typer.Option(
            "--demo", help="Also run the bundled demo identity provider; print a user token."
        ),
    ] = False,
    host: Annotated[str | None, typer.Option(help="Listen address (AIRLOCK_HOST).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Listen port (AIRLOCK_PORT).")
    ] = None,
) -> None:
    """Run the controller (HTTP API, scheduler, reconciler)."""
    import uvicorn

    from airlock.api.app import create_app
    from airlock.api.vnc_proxy import SERVER_OPTIONS
    from airlock.logs import setup_logging

    settings = _settings()
    updates: dict[str, Any] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    if updates:
        settings = settings.model_copy(update=updates)
    setup_logging(settings.log_level, settings.log_json)
    if demo:

        async def demo_token(core: Core) -> str:
            # One demo token at a time: the one printed by the last start.
            return (await core.tokens.rotate("user", "demo", actor=DEMO_TOKEN_ACTOR)).value

        token = _with_core(settings, demo_token)
        # The token is shown to the person starting the demo, never logged.
        sys.stderr.write(
            f"\n  Airlock (demo) at {settings.base_url}  (API docs: {settings.base_url}/docs)\n"
            f"  Dashboard token for user demo: {token}\n"
            f"  Demo IdP login: {settings.demo_user} / {settings.demo_password}\n\n"
        )
        sys.stderr.flush()
    config = uvicorn.Config(
        create_app(settings, demo=demo),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=5,
        **SERVER_OPTIONS,
    )
    uvicorn.Server(config).run()


# --- tokens -------------------------------------------------------------------------------
def _token_json(token: Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "kind": token.kind,
        "subject": token.subject,
        "createdAt": _iso(token.created_at),
        "revokedAt": _iso(token.revoked_at),
    }


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str | None, typer.Option(help="A user token acting as this user.")] = None,
    service: Annotated[
        str | None, typer.Option(help="A service token (a trusted backend) with this name.")
    ] = None,
) -> None:
    """Create a token and print it, alone, on standard output (it is not shown again)."""
    if (user is None) == (service is None):
        _fail("give exactly one of --user NAME or --service NAME", 2)
    kind: Any = "user" if user is not None else "service"
    subject = user if user is not None else service
    assert subject is not None
    try:
        check_name(subject, "user id" if kind == "user" else "service name")
    except AirlockError as exc:
        _fail(exc.message, 2)

    async def create(core: Core) -> tuple[Token, str]:
        issued = await core.tokens.create(kind, subject)
        return issued.token, issued.value

    token, value = _with_core(_settings(), create)
    err.print(f"created {kind} token {token.id} for {subject}; it is shown only now")
    sys.stdout.write(value + "\n")


@tokens_app.command("list")
def tokens_list(as_json: JsonOpt = False) -> None:
    """Every token (ids and owners, never values)."""
    tokens = _with_core(_settings(), lambda core: core.tokens.list())
    if as_json:
        _print_json([_token_json(t) for t in tokens])
        return
    now = datetime.now(UTC)
    table = Table("id", "kind", "subject", "created", "revoked")
    for t in tokens:
        table.add_row(
            t.id,
            t.kind,
            t.subject,
            relative(t.created_at, now),
            relative(t.revoked_at, now) if t.revoked_at else "-",
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke a token at once (idempotent)."""
    token = _with_core(_settings(), lambda core: core.tokens.revoke(token_id))
    err.print(f"revoked {token.kind} token {token.id} ({token.subject})")


# --- vault --------------------------------------------------------------------------------
@vault_app.command("rotate")
def vault_rotate(as_json: JsonOpt = False) -> None:
    """Re-encrypt every credential under a new key; old keys are dropped only at the end.
    Safe while the server runs (it reloads the key file) and safe to re-run after a crash."""
    from airlock.services.keys import rotate

    async def action(core: Core) -> Any:
        assert core.vault is not None
        return await rotate(core.db, core.vault, core.clock)

    report = _with_core(_settings(), action)
    result = {
        "newKey": report.new_key,
        "reencrypted": report.reencrypted,
        "droppedKeys": report.dropped,
    }
    if as_json:
        _print_json(result)
    else:
        err.print(
            f"current key {report.new_key}: {report.reencrypted} credential(s) re-encrypted, "
            f"{len(report.dropped)} old key(s) dropped"
        )


# --- sessions and VMs ---------------------------------------------------------------------
LIVE_SESSION = [SessionStatus.INITIALIZING.value, SessionStatus.AWAITING_USER.value]


def _session_json(session: AuthSession, vm: Vm | None) -> dict[str, Any]:
    return {
        "sessionId": session.id,
        "userId": session.user_id,
        "provider": session.provider,
        "status": session.status,
        "failureReason": session.failure_reason,
        "createdAt": _iso(session.created_at),
        "updatedAt": _iso(session.updated_at),
        "completedAt": _iso(session.completed_at),
        "vm": _vm_json(vm) if vm is not None else None,
    }


def _vm_json(vm: Vm) -> dict[str, Any]:
    return schemas.vm_detail(vm).model_dump(mode="json")  # as GET /api/vms answers


@sessions_app.command("ls")
def sessions_ls(
    all_: Annotated[
        bool, typer.Option("--all", help="Also finished sessions (the newest 200).")
    ] = False,
    user: Annotated[str | None, typer.Option(help="Only this user's sessions.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sessions in progress (initializing, awaiting the user); --all for every one."""

    async def load(core: Core) -> list[tuple[AuthSession, Vm | None]]:
        if all_:
            return await core.sessions.list(user, limit=200)
        rows = []
        for status in LIVE_SESSION:
            rows += await core.sessions.list(user, status, limit=1000)
        return sorted(rows, key=lambda r: r[0].created_at, reverse=True)

    rows = _with_core(_settings(), load)
    if as_json:
        _print_json([_session_json(s, vm) for s, vm in rows])
        return
    now = datetime.now(UTC)
    table = Table("session", "user", "provider", "status", "vm", "vm state", "created", "reason")
    for s, vm in rows:
        table.add_row(
            s.id,
            s.user_id,
            s.provider,
            s.status,
            vm.id if vm else "-",
            vm.state if vm else "-",
            relative(s.created_at, now),
            s.failure_reason or "",
        )
    out.print(table)
    if not rows:
        err.print("no sessions" if all_ else "no sessions in progress (--all for every one)")


@egress_app.command("suggest")
def egress_suggest(
    provider: Annotated[str, typer.Argument(help="The provider id, e.g. codex.")],
    demo: Annotated[
        bool, typer.Option("--demo", help="The demo's oauth2 provider, as `serve --demo`.")
    ] = False,
) -> None:
    """Print the hosts a provider's learn-mode sessions reached, as a ready policy setting
    (AIRLOCK_EGRESS_<PROVIDER>_POLICY=...); the endpoints it always allows are left out."""
    settings = _settings()
    try:
        core = Core(settings, demo=demo)
    except ValueError as exc:
        _fail(str(exc), 2)
    if provider not in core.egress.policies:
        _fail(f"unknown provider {provider!r} (known: {', '.join(sorted(core.egress.policies))})")
    policy = core.egress.policy(provider)

    async def run() -> str:
        try:
            await core.open()
            return await egress_suggestion(core.db, policy)
        finally:
            await core.close()

    sys.stdout.write(asyncio.run(run()))


@vms_app.command("ls")
def vms_ls(
    all_: Annotated[
        bool, typer.Option("--all", help="Also destroyed and lost VMs (tombstones).")
    ] = False,
    user: Annotated[str | None, typer.Option(help="Only this user's VMs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """What runs: live VMs with their state and destroy deadline; --all for tombstones."""
    vms = _with_core(_settings(), lambda core: core.vms.list(user, live_only=not all_))
    if as_json:
        _print_json([_vm_json(vm) for vm in vms])
        return
    now = datetime.now(UTC)
    table = Table("vm", "role", "user", "runtime", "state", "created", "destroy after", "reason")
    for vm in vms:
        table.add_row(
            vm.id,
            vm.role,
            vm.user_id,
            vm.runtime,
            vm.state,
            relative(vm.created_at, now),
            relative(vm.destroy_after, now),
            vm.destroy_reason or "",
        )
    out.print(table)
    if not vms:
        err.print("no VMs" if all_ else "no live VMs (--all for tombstones)")


# --- reap ---------------------------------------------------------------------------------
@app.command()
def reap(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would be done.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Reconcile once: destroy orphan VMs, mark vanished ones lost or destroyed."""
    report = _with_core(_settings(), lambda core: core.reconciler.reconcile_once(dry_run=dry_run))
    if report.skipped:
        _fail("the runtime could not be listed; nothing was done (see the log above)")
    done = report.actions if dry_run else report.applied
    rows = [
        {
            "action": a.kind.value,
            "vmId": a.vm_id,
            "expectedState": a.expected_state.value if a.expected_state else None,
        }
        for a in done
    ]
    if as_json:
        _print_json({"dryRun": dry_run, "running": report.running, "actions": rows})
        return
    verb = "would do" if dry_run else "done"
    table = Table("action", "vm", "row state", title=f"{report.running} VMs running; {verb}:")
    for row in rows:
        table.add_row(row["action"], row["vmId"], row["expectedState"] or "-")
    out.print(table)
    if not rows:
        err.print("nothing to do: the runtime and the database agree")
    elif not dry_run and len(report.applied) < len(report.actions):
        skipped = len(report.actions) - len(report.applied)
        err.print(f"{skipped} action(s) were not applied (the row moved meanwhile or failed)")


# --- image --------------------------------------------------------------------------------
@image_app.command("build")
def image_build(
    flavor: Annotated[
        str,
        typer.Option(
            "--flavor",
            help="browser (Xvnc + Chromium), cli (Node.js + the vendor CLIs), or minimal.",
        ),
    ] = "minimal",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a guest image from Debian packages (cached by content: a no-op when built)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from airlock.images import ImageBuildError, build_image

    settings = _settings()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=as_json,
    ) as progress:
        task = progress.add_task(f"{flavor} image", total=None)

        def report(what: str, step: int, steps: int) -> None:
            progress.update(task, description=f"{flavor}: {what}", completed=step, total=steps)

        try:
            image = build_image(settings.image_dir, flavor, progress=report, force=force)
        except ImageBuildError as exc:
            _fail(str(exc))
    manifest = json.loads((image.path / "manifest.json").read_text())
    if as_json:
        _print_json({"path": str(image.path), **manifest})
        return
    out.print(str(image.path))


# --- doctor -------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str | None = None


def _binary(
    name: str, candidates: tuple[str, ...], package: str, *, required: bool, why: str
) -> Check:
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return Check(name, True, required, f"{found}")
    return Check(name, False, required, f"not found ({why})", f"apt-get install {package}")


def _kvm_probe(image_dir: Path, accel: str) -> Check | None:
    """What the qemu runtime will choose, by its own probe (cached) with a built image."""
    from airlock.images import find_image
    from airlock.runtimes.kvm_probe import probe_kvm

    qemu = shutil.which("qemu-system-x86_64")
    image = next((i for f in ("minimal", "browser") if (i := find_image(image_dir, f))), None)
    if qemu is None or image is None:
        return None
    if accel == "tcg":
        return Check("kvm", True, False, "present; qemu will use TCG (AIRLOCK_QEMU_ACCEL=tcg)")
    usable, why = probe_kvm(qemu, image, image_dir)
    if usable:
        return Check("kvm", True, False, f"usable for stock kernels ({why}); qemu will use KVM")
    return Check(
        "kvm",
        True,
        False,
        f"KVM present but unusable for stock kernels ({why}); qemu will use TCG",
    )


def _kvm_check(runtime: str, image_dir: Path, accel: str = "auto") -> Check:
    kvm = Path("/dev/kvm")
    required = runtime == "firecracker"
    if not kvm.exists():
        return Check(
            "kvm",
            False,
            required,
            "/dev/kvm absent: qemu would use TCG (slow); firecracker cannot run",
            "run on a host with KVM (bare metal, or nested virtualisation enabled)",
        )
    try:
        os.close(os.open(kvm, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Check(
            "kvm",
            False,
            required,
            f"/dev/kvm present but not openable: {exc.strerror}; qemu would use TCG",
            "add this user to the kvm group (usermod -aG kvm $USER)",
        )
    probed = _kvm_probe(image_dir, accel)
    if probed is not None:
        return probed if not required or probed.ok else Check("kvm", False, True, probed.detail)
    pvm = Path("/sys/module/kvm_pvm").exists()
    if pvm:
        return Check(
            "kvm",
            not required,
            required,
            "KVM present but unusable for stock kernels (served by kvm-pvm: only specially "
            "built guest kernels run); qemu will use TCG",
            "use TCG (qemu) or a PVM guest kernel" if required else None,
        )
    return Check(
        "kvm",
        True,
        required,
        "present and openable; not probed for a stock kernel yet (no guest image: "
        "airlock image build --flavor minimal)",
    )


def _data_dir_check(data_dir: Path) -> Check:
    if data_dir.exists():
        try:
            with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".doctor-"):
                pass
        except OSError as exc:
            return Check(
                "data dir", False, True, f"{data_dir} not writable: {exc.strerror}", "chown it"
            )
        return Check("data dir", True, True, f"{data_dir} writable")
    parent = next(p for p in data_dir.parents if p.exists())
    if os.access(parent, os.W_OK | os.X_OK):
        return Check("data dir", True, True, f"{data_dir} will be created (in {parent})")
    return Check(
        "data dir",
        False,
        True,
        f"{data_dir} missing and {parent} not writable",
        "set AIRLOCK_DATA_DIR to a writable directory",
    )


def _containment_checks(runtime: str) -> list[Check]:
    """What keeps a sandbox VM in (runtimes/confine.py): a root controller (per-VM uids,
    cgroups, tmpfs), user namespaces for an unprivileged uid, seccomp, cgroup limits."""
    from airlock.runtimes import confine

    required = runtime == "sandbox"
    checks = []
    if confine.privileged():
        checks.append(Check("controller uid", True, required, "root: each VM gets its own uid"))
    else:
        checks.append(
            Check(
                "controller uid",
                False,
                required,
                f"uid {os.geteuid()}: VMs would run as this user, with no cgroup limits, no "
                "uid of their own and no size limit on their state dirs",
                "run the controller as root: it drops every VM to a uid of its own",
            )
        )
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        problem = confine.userns_problem(bwrap)
        checks.append(
            Check(
                "user namespaces",
                problem is None,
                required,
                "an unprivileged uid can create one" if problem is None else problem,
                None
                if problem is None
                else "sysctl -w user.max_user_namespaces=15000; on Debian kernels before 6.1 "
                "also kernel.unprivileged_userns_clone=1; on Ubuntu 23.10+ "
                "kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile "
                "allowing userns for /usr/bin/bwrap)",
            )
        )
    seccomp = "Seccomp:" in Path("/proc/self/status").read_text()
    checks.append(
        Check(
            "seccomp",
            seccomp,
            required,
            "the kernel filters syscalls" if seccomp else "kernel without CONFIG_SECCOMP",
            None if seccomp else "a kernel built with CONFIG_SECCOMP_FILTER",
        )
    )
    problem = confine.cgroup_problem()
    layout = confine.cgroup_layout()
    if problem is None and layout is not None:
        kind, parents = layout
        where = ", ".join(str(p) for p in parents.values())
        detail = f"cgroup {kind}: VM leaves under {where}"
        if kind == "v1":
            detail += " (no cgroup v2 memory/pids/cpu here; v1 limits work the same)"
        checks.append(Check("cgroups", True, required, detail))
    else:
        checks.append(
            Check(
                "cgroups",
                False,
                required,
                problem or "no cgroups",
                "mount cgroup2 with the memory, pids and cpu controllers (systemd: "
                "systemd.unified_cgroup_hierarchy=1); in a container or a systemd unit, "
                "delegate a cgroup subtree to the controller (Delegate=yes, or docker/podman "
                "--cgroupns=private with a writable /sys/fs/cgroup)",
            )
        )
    return checks


async def _database_check(settings: Settings) -> Check:
    where = settings.db_url.split("@")[-1]  # never print a password in the URL
    db = Database(settings.db_url)
    try:
        await asyncio.wait_for(db.ping(), 10)
        return Check("database", True, True, f"reachable ({where})")
    except Exception as exc:
        return Check(
            "database",
            False,
            True,
            f"not reachable ({where}): {type(exc).__name__}: {str(exc)[:200]}",
            "check AIRLOCK_DATABASE_URL (or the data dir for SQLite)",
        )
    finally:
        await db.close()


async def _runtime_check(settings: Settings) -> Check:
    name = f"runtime {settings.runtime}"
    try:
        problems = await make_runtime(settings).check()
    except Exception as exc:
        return Check(name, False, True, f"{type(exc).__name__}: {str(exc)[:300]}")
    if problems:
        return Check(name, False, True, "; ".join(problems))
    return Check(name, True, True, "self-check passed")


def doctor_checks(settings: Settings) -> list[Check]:
    runtime = settings.runtime
    checks = [
        _binary(
            "bwrap",
            ("bwrap",),
            "bubblewrap",
            required=runtime == "sandbox",
            why="the sandbox runtime's isolation",
        ),
        _binary(
            "Xvnc",
            ("Xvnc",),
            "tigervnc-standalone-server",
            required=runtime == "sandbox",
            why="the browser VM's display and VNC server",
        ),
        _binary(
            "chromium",
            ("chromium", "chromium-browser", "google-chrome"),
            "chromium",
            required=runtime == "sandbox",
            why="the browser in the browser VM",
        ),
        _binary(
            "pasta",
            ("pasta", "passt"),
            "passt",
            required=False,
            why="only for general egress from a sandbox; the egress proxy needs none",
        ),
        _binary(
            "qemu-system-x86_64",
            ("qemu-system-x86_64",),
            "qemu-system-x86 qemu-utils",
            required=runtime == "qemu",
            why="the qemu runtime",
        ),
        _kvm_check(runtime, settings.image_dir, settings.qemu_accel),
        _data_dir_check(settings.data_dir),
        *_containment_checks(runtime),
    ]
    if runtime == "firecracker":
        checks.append(
            _binary(
                "firecracker",
                ("firecracker",),
                "firecracker (from its GitHub releases; not in Debian)",
                required=True,
                why="the firecracker runtime",
            )
        )

    sqlite_file = Path(settings.db_url.split(":///", 1)[-1])
    sqlite_missing = settings.db_url.startswith("sqlite") and not sqlite_file.exists()

    async def probes() -> list[Check]:
        if sqlite_missing:  # connecting would create it; doctor changes nothing
            database = Check("database", True, True, f"{sqlite_file} made at first start")
        else:
            database = await _database_check(settings)
        return [database, await _runtime_check(settings)]

    return checks + asyncio.run(probes())


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Check this host for what the configured runtime needs; exit 1 if a required check
    fails."""
    settings = _settings()
    checks = doctor_checks(settings)
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        _print_json(
            {"runtime": settings.runtime, "ok": not failed, "checks": [asdict(c) for c in checks]}
        )
    else:
        table = Table("check", "", "detail", "fix", title=f"runtime: {settings.runtime}")
        for c in checks:
            mark = "[green]ok[/green]" if c.ok else "[red]FAIL[/red]" if c.required else "-"
            table.add_row(c.name, mark, c.detail, c.fix or "")
        out.print(table)
        if failed:
            err.print(f"[red]{len(failed)} required check(s) failed[/red]")
    if failed:
        raise typer.Exit(1)
