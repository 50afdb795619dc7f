"""Firecracker's OpenAPI (Swagger 2.0) spec as a request validator: the method and path must
exist, the body must match the body parameter's schema ($refs resolved against the spec's
definitions; enums and required fields included)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# ``../shared`` beside the repository, as developers and CI have it.
SPEC = Path(__file__).resolve().parents[3] / "shared/specs/firecracker-api-v1.17.0-dev.yaml"


@functools.cache
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    assert loaded["swagger"] == "2.0"
    return loaded


def _operation(method: str, path: str) -> dict[str, Any]:
    for template, item in spec()["paths"].items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            op = item.get(method.lower())
            if op is None:
                raise AssertionError(f"{method} is not an operation of {template} in the spec")
            return dict(op)
    raise AssertionError(f"no path {path} in the spec")


def validate(method: str, path: str, body: Any) -> None:
    """Raise AssertionError or jsonschema.ValidationError unless the request is valid."""
    op = _operation(method, path)
    params = [p for p in op.get("parameters", []) if p.get("in") == "body"]
    if not params:
        assert body is None, f"{method} {path} takes no body"
        return
    param = params[0]
    if body is None:
        assert not param.get("required"), f"{method} {path} requires a body"
        return
    schema = {**param["schema"], "definitions": spec()["definitions"]}
    jsonschema.Draft4Validator(schema).validate(body)
