"""The HTTP routes, one module per group: auth sessions, VMs, providers, operations."""

from __future__ import annotations

from fastapi import APIRouter

from airlock.api.routes import ops, providers, sessions, viewer, vms

ROUTERS: tuple[APIRouter, ...] = (
    sessions.router,
    viewer.router,
    vms.router,
    providers.router,
    ops.router,
)
