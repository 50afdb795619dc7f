"""What the runtimes share from ``runtimes/vmdir.py``."""

from __future__ import annotations

from pathlib import Path

from airlock.runtimes import vmdir


def test_a_failed_boot_keeps_the_first_error_not_its_last_thousand_copies(
    tmp_path: Path,
) -> None:
    log = tmp_path / "console.log"
    boot = [f"[    0.{i:06d}] booting step {i}" for i in range(40)]
    error = [
        "2026-12-01 10:00:00,123 mux ERROR Exception in callback Future.set_result(None)",
        "asyncio.exceptions.InvalidStateError: invalid state",
    ]
    repeats = [
        line.replace("10:00:00,123", f"10:{i // 60 % 60:02d}:{i % 60:02d},{i % 1000:03d}")
        for i in range(30_000)
        for line in error
    ]
    log.write_text("\n".join([*boot, *repeats, "the last line"]) + "\n")
    assert log.stat().st_size > 2_000_000
    text = vmdir.log_excerpt(log)
    assert len(text) <= vmdir.EXCERPT_MAX_CHARS
    assert "booting step 0" in text and "booting step 39" in text  # the start survives
    assert text.count("InvalidStateError") == 1  # the error once, with how often it came
    assert "InvalidStateError: invalid state  [x" in text
    assert "Future.set_result(None)  [x" in text
    assert text.rstrip().endswith("the last line")
    assert vmdir.log_excerpt(tmp_path / "none.log") == "(no none.log)"
