"""The web pages: the dashboard at ``/``, our own scripts and styles under ``/static/app/``
(``api/web/``, package data), and noVNC's ES modules under ``/static/novnc/``, straight
from the ``node_modules`` that ``scripts/setup.sh`` installs with ``npm ci`` (pinned by
``package-lock.json``; never committed, never copied).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

import airlock

WEB_DIR = Path(__file__).resolve().parent / "web"
# src/airlock/__init__.py -> the checkout's root, where package.json and node_modules live.
NOVNC_DIR = Path(airlock.__file__).resolve().parents[2] / "node_modules" / "@novnc" / "novnc"

PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}

MESSAGE_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Airlock</title>
<link rel="stylesheet" href="/static/app/style.css">
</head>
<body class="message-page">
<main>
<h1>{title}</h1>
<p role="alert">{message}</p>
<p><a href="/">Back to the dashboard</a></p>
</main>
</body>
</html>
"""


def novnc_installed() -> bool:
    return (NOVNC_DIR / "core" / "rfb.js").is_file()


@cache
def read_page(name: str) -> str:
    return (WEB_DIR / name).read_text(encoding="utf-8")


class _InstalledLater(StaticFiles):
    """Static files from a folder set-up may not have made yet: 404 until it exists, not
    Starlette's 500 (it checks the folder on the first request)."""

    async def check_config(self) -> None:
        if novnc_installed():
            await super().check_config()


def mount(app: FastAPI) -> None:
    """Add the dashboard route and the two static folders to ``app``."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(read_page("index.html"), headers=PAGE_HEADERS)

    app.mount("/static/app", StaticFiles(directory=WEB_DIR), name="web")
    # Without set-up the app still starts: the viewer page says what is missing.
    app.mount("/static/novnc", _InstalledLater(directory=NOVNC_DIR, check_dir=False), name="novnc")
