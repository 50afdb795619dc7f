"""The provider plugin interface.

A provider says how to start a login inside the browser VM (a ``LoginPlan`` the guest agent
runs), which files hold the result, how to validate and normalise them into ``Credentials``,
which hosts the browser VM may reach for it (its ``EgressPolicy``), and, for the handoff,
which files to write into a CLI VM (``injection``) and how the CLI itself confirms them
(``verification``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from airlock.domain.credential_health import CheckResult
from airlock.domain.egress_policy import EgressPolicy


@dataclass(frozen=True, slots=True)
class LoginPlan:
    """What the guest agent runs (see ``agent.protocol``)."""

    provider: str
    argv: list[str]
    watch: list[str]  # paths relative to the VM user's home
    env: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"provider": self.provider, "argv": self.argv, "env": self.env, "watch": self.watch}


@dataclass(frozen=True, slots=True)
class Account:
    id: str | None = None
    email: str | None = None
    organization: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """The normalised form (providers.md): what the vault stores and the API reports."""

    provider: str
    access_token: str
    refresh_token: str | None
    expires_at: datetime | None  # UTC
    scopes: list[str]
    account: Account
    plan: str | None
    raw: dict[str, bytes]  # the original files, byte for byte, by home-relative path
    refreshed_at: datetime | None = None  # UTC; when the vendor last issued the tokens
    refresh_expires_at: datetime | None = None  # UTC; the refresh token's end, where stated


@dataclass(frozen=True, slots=True)
class InjectFile:
    """One file the handoff writes into a CLI VM (home-relative path). Companion settings
    are ``only_if_absent``: the user's own settings in a VM are never overwritten."""

    path: str
    content: bytes
    mode: int = 0o600
    only_if_absent: bool = False


@dataclass(frozen=True, slots=True)
class RunOutcome:
    exit_code: int | None
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class Verification:
    """A command run in the CLI VM after the injection, and how to read its result:
    ``judge`` answers (logged in?, a one-line summary without secrets). ``check`` says which
    check this is and why it is the best this CLI offers."""

    argv: list[str]
    check: str
    judge: Callable[[RunOutcome], tuple[bool, str]]
    timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class StatusCheck:
    """The CLI's own offline status check (or, for ``oauth2``, introspection at the token
    server), run in the VM that holds a login on a schedule: ``judge`` reads its outcome as
    a ``CheckResult`` and a one-line summary without secrets."""

    argv: list[str]
    check: str
    judge: Callable[[RunOutcome], tuple[CheckResult, str]]
    timeout_s: float = 60.0


def judge_by_verification(
    verification: Verification,
) -> Callable[[RunOutcome], tuple[CheckResult, str]]:
    """A ``Verification``'s verdict as a check result: logged in is OK, else logged out
    (a CLI's offline status says no more than that)."""

    def judge(outcome: RunOutcome) -> tuple[CheckResult, str]:
        if outcome.exit_code is None:
            return CheckResult.UNKNOWN, f"{verification.check}: timed out"
        ok, summary = verification.judge(outcome)
        return (CheckResult.OK if ok else CheckResult.LOGGED_OUT), summary

    return judge


class Provider(Protocol):
    id: str
    name: str

    def available(self) -> str | None:
        """None when this provider can run here, else the reason it cannot."""
        ...

    def login_plan(self) -> LoginPlan: ...

    def egress_policy(self) -> EgressPolicy:
        """The hosts its login page needs (sources cited in the module); the operator's
        ``AIRLOCK_EGRESS_<PROVIDER>_*`` settings are applied on top by the controller."""
        ...

    def normalise(self, files: dict[str, bytes], *, now: datetime) -> Credentials:
        """Validate captured files and normalise them. Raises ``CredentialError``."""
        ...

    def injection(self, creds: Credentials) -> list[InjectFile]:
        """The files that log the CLI in inside a CLI VM: the vendor's own format, from
        ``creds.raw``, plus companion settings it needs to start without prompts."""
        ...

    def verification(self) -> Verification | None:
        """The CLI's own check that it is logged in, or None when there is no CLI."""
        ...

    def status_check(self) -> StatusCheck | None:
        """The check the controller runs on a schedule in the VM that holds a login: the
        CLI's offline status, or None where the CLI has none that is offline and cheap."""
        ...
