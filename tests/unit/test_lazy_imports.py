"""The pure core imports no I/O library: it stays fast to import and testable without servers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CORE_MODULES = ("schemas.models", "schemas.codec", "schemas.mdc")
OPTIONAL_CORE_MODULES = (
    "gateway.records",
    "gateway.delivery_window",
    "gateway.errors",
    "gateway.pipeline",
    "gateway.rules",
    "gateway.topics",
    "gateway.points",
    "gateway.admission",
    "simulator.model",
)
FORBIDDEN = ("paho", "serial", "influxdb_client", "sqlite3", "urllib3")


def existing_core_modules() -> list[str]:
    """The core modules, plus the optional ones that exist in this checkout."""
    return [*CORE_MODULES, *(m for m in OPTIONAL_CORE_MODULES if importlib.util.find_spec(m))]


def modules_loaded_by(module: str) -> set[str]:
    """Top-level names in sys.modules after importing `module` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=REPO,
    )
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("module", existing_core_modules())
def test_core_module_does_not_import_io_libraries(module: str) -> None:
    loaded = modules_loaded_by(module)
    assert module.split(".")[0] in loaded
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded.intersection(FORBIDDEN))


def test_the_check_would_see_a_forbidden_import() -> None:
    assert "sqlite3" in modules_loaded_by("sqlite3")
