"""The HTTP API (http-api.md): ``create_app()`` builds the FastAPI application."""

from __future__ import annotations

from airlock.api.app import create_app

__all__ = ["create_app"]
