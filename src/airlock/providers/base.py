"""The provider plugin interface.

A provider says how to start a login inside the browser VM (a ``LoginPlan`` the guest agent
runs), which files hold the result, how to validate and normalise them into ``Credentials``,
which hosts the browser VM may reach for it (the egress allowlist), and, for the handoff,
which files to write into a CLI VM and how to verify them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


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
class Route:
    """One destination the browser VM may reach through the egress proxy. ``target`` lets
    a name that exists only for Airlock (the demo IdP's) lead to a real address."""

    host: str
    port: int
    target: tuple[str, int] | None = None


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


class Provider(Protocol):
    id: str
    name: str

    def available(self) -> str | None:
        """None when this provider can run here, else the reason it cannot."""
        ...

    def login_plan(self) -> LoginPlan: ...

    def egress_routes(self) -> list[Route]: ...

    def normalise(self, files: dict[str, bytes], *, now: datetime) -> Credentials:
        """Validate captured files and normalise them. Raises ``CredentialError``."""
        ...
