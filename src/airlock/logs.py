"""Structured logs: JSON lines when not on a TTY, readable lines on one.

Fields passed with ``extra=`` (``session_id``, ``vm_id``, ``state`` ...) become JSON keys.
Secrets are simply never handed to a logger (a test greps the logs of a full login for the
token values), with one exception we do not control: uvicorn logs each WebSocket's path with
its query (``"WebSocket /api/.../vnc?token=..." [accepted]``), so ``token=`` values in
uvicorn's records are redacted here.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


_TOKEN_QUERY = re.compile(r"([?&]token=)[^&\s\"']+")


class RedactQueryTokens(logging.Filter):
    """Viewer tokens ride in WebSocket and viewer-page URLs; uvicorn logs those URLs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn"):
            if isinstance(record.msg, str):
                record.msg = _TOKEN_QUERY.sub(r"\1[redacted]", record.msg)
            if isinstance(record.args, tuple):
                record.args = tuple(
                    _TOKEN_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                    for a in record.args
                )
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: _jsonable(v) for k, v in _fields(record).items()})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        text = f"{text}  {extra}" if extra else text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def setup_logging(level: str = "INFO", json_lines: bool | None = None) -> None:
    """Configure the root logger once per process (idempotent)."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(RedactQueryTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
