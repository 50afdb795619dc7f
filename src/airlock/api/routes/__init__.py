"""The HTTP routes, one module per group: auth sessions, the VNC
socket and viewer tokens, a session's egress denials, VMs, logins (credentials),
providers, operations."""

from __future__ import annotations

from fastapi import APIRouter

from airlock.api.routes import (
    credentials,
    egress,
    internal,
    nodes,
    ops,
    providers,
    sessions,
    viewer,
    vms,
    vnc,
)

ROUTERS: tuple[APIRouter, ...] = (
    sessions.router,
    egress.router,
    viewer.router,
    vnc.router,
    vms.router,
    credentials.router,
    providers.router,
    ops.router,
    nodes.router,
    internal.router,
)
