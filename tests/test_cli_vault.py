"""``airlock vault rotate`` run for real (the console script, as a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import Cli, cli  # noqa: F401  (the fixture)


def test_vault_rotate_replaces_the_key_and_refuses_a_readable_key_file(cli: Cli) -> None:  # noqa: F811
    cli("tokens", "create", "--user", "alice")  # opens the controller: creates the key file
    key_file: Path = cli.data_dir / "secret.key"
    before = json.loads(key_file.read_text())

    report = cli.json("vault", "rotate")
    after = json.loads(key_file.read_text())
    assert report["newKey"] == after["current"] != before["current"]
    assert report["droppedKeys"] == [before["current"]] and list(after["keys"]) == [
        after["current"]
    ]
    assert report["reencrypted"] == 0

    key_file.chmod(0o644)
    result = cli("vault", "rotate", ok=False)
    assert result.returncode == 1
    assert "chmod 600" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(key_file.read_text()) == after  # nothing rewritten
