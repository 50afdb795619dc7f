"""Schemathesis against a live server: requests generated from our own OpenAPI document
(valid and invalid ones), every answer checked against that document. Any server error or
schema problem (an undocumented status, a body or header that does not match) fails.

The app is the API tests' (``NoVmRuntime``: nothing boots, a start's VM fails at once) on
a real uvicorn server, driven by the ``st`` command in its own process with a user token
(the user's own routes and the 403 of naming another user) and bounded by
``MAX_EXAMPLES`` per operation. Every operation of the document runs in every phase
(examples, coverage, fuzzing) whatever the count; the count bounds how many cases each
operation gets. 20 (it was 60) keeps ``make test`` quick with the same operations covered;
``AIRLOCK_TEST_SCHEMATHESIS_EXAMPLES=200`` fuzzes deeper.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.api.conftest import ApiFactory
from tests.api.live import serve

ST = Path(sys.executable).with_name("st")
MAX_EXAMPLES = int(os.environ.get("AIRLOCK_TEST_SCHEMATHESIS_EXAMPLES", "20"))
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    )
)
RUN_TIMEOUT_S = 600


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_schemathesis_finds_no_server_error_and_no_schema_problem(
    make_api: ApiFactory, tmp_path: Path
) -> None:
    # The per-client limit would answer a flood of token-less requests with 429 (which
    # the document lists); off here, so every generated request reaches its route.
    api = await make_api(client_requests_per_minute=0, user_starts_per_minute=1000)
    api.runtime.boots_succeed = True  # CLI VMs are created: their routes answer 2xx too
    async with serve(api.app, lifespan=False) as url:
        proc = await asyncio.create_subprocess_exec(
            str(ST),
            "run",
            f"{url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "11",
            # One worker: with threads, hypothesis's lambda descriptions call ast.parse
            # concurrently, which CPython 3.11 turns into a SystemError (recursion depth
            # mismatch) that fails the run.
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--header",
            f"Authorization: Bearer {api.tokens['alice']}",
            "--request-timeout",
            "20",
            # An endless stream (it ends after 10 minutes): every call would wait out the
            # request timeout. tests/api/test_credentials.py reads it whole instead.
            "--exclude-path",
            "/api/credentials/events",
            "--suppress-health-check",
            "all",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-20_000:]
    assert "passed" in text.lower(), text[-5_000:]
    assert "Runtime Error" not in text and "server error" not in text.lower(), text[-5_000:]
    # The run's own count, for `pytest -rP` (e.g. "2242 generated, 2242 passed").
    print("\n".join(line for line in text.splitlines() if " generated, " in line))
