"""The HTTP API (http-api.md): ``create_app()`` builds the FastAPI application.

``create_app`` is imported on first use, so the CLI can use ``airlock.api.schemas``
without loading FastAPI and uvicorn for commands that do not serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airlock.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from airlock.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
