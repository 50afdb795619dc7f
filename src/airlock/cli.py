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
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from airlock import cli_credentials, cli_nodes
from airlock.api import schemas
from airlock.cli_common import (
    JsonOpt,
    err,
    fail,
    load_settings,
    out,
    print_json,
    relative,
    with_core,
)
from airlock.cli_doctor import doctor
from airlock.domain.sessions import SessionStatus
from airlock.errors import AirlockError
from airlock.services.core import Core
from airlock.services.egress import suggest as egress_suggestion
from airlock.services.tokens import check_name
from airlock.store.tables import AuthSession, Token, Vm

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
app.add_typer(cli_nodes.nodes_app, name="nodes")
app.add_typer(cli_credentials.app, name="credentials")
app.command()(doctor)


def main() -> None:
    app()


# --- plumbing: in cli_common; the old names stay for modules that import them from here --
_fail = fail
_settings = load_settings
_with_core = with_core
_print_json = print_json


def _iso(value: datetime | None) -> str | None:
    return schemas.iso(value) if value is not None else None


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
    else:
        # Migrate and check the cluster key before serving: a key file that is not the
        # cluster's is one clear message and exit status 1, not a traceback from uvicorn.
        _with_core(settings, cli_nodes.preflight)
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
