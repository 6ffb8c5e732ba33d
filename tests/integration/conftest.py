"""The end-to-end scaffold as a fixture: collectors, wards, station configs and gateways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import Scaffold


@pytest.fixture
def scaffold(tmp_path: Path) -> Iterator[Scaffold]:
    """Starts what a test asks for in its tmp_path; stops it all after the test, newest first."""
    started = Scaffold(tmp_path)
    try:
        yield started
    finally:
        started.close()
