"""The dashboard's pure state (web/dashboard/src/ward.js) under node's own test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "web" / "dashboard"
TEST_TIMEOUT_S = 120


def test_the_ward_state_passes_its_javascript_tests() -> None:
    node = shutil.which("node")
    assert node is not None, "node not found: install the Debian package 'nodejs' (bootstrap)"
    run = subprocess.run(
        [node, "--test", "test/"], cwd=SOURCE, capture_output=True, text=True,
        timeout=TEST_TIMEOUT_S, check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout
