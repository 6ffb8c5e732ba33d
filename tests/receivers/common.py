"""What the test receivers share: their command line, their SQLite log, and the control file
that makes them answer on demand (re-read for every message).

The receivers run as scripts (tests/interop_servers.py starts them); each puts the repository
on sys.path before importing this module.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def argument_parser(description: str) -> argparse.ArgumentParser:
    """--port, --store, --control and --no-validate; a receiver adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--control", type=Path)
    parser.add_argument("--no-validate", action="store_true")
    return parser


def open_store(path: Path, schema: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """The receiver's log, autocommit, WAL: it survives a process restart."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


def matching(patterns: dict[str, Any], record_id: str) -> Any:
    """The value of the first pattern (fnmatch, e.g. "P0001:*:7") that matches the id."""
    for pattern, value in patterns.items():
        if fnmatch.fnmatchcase(record_id, pattern):
            return value
    return None


@dataclass(frozen=True)
class OnDemand:
    """An answer the control file asks for: `code` from "reject", else None for "transient"."""

    record_id: str
    code: Any


class Control:
    """The control file: {"reject": {pattern: code}, "transient": {pattern: times}, ...}."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.transient_answered: dict[str, int] = {}

    def read(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def on_demand(self, settings: dict[str, Any], record_ids: list[str]) -> OnDemand | None:
        """The first record id rejected or (still) transient by `settings`, or None."""
        for record_id in record_ids:
            code = matching(settings.get("reject", {}), record_id)
            if code:
                return OnDemand(record_id, code)
            wanted = int(matching(settings.get("transient", {}), record_id) or 0)
            if self.transient_answered.get(record_id, 0) < wanted:
                self.transient_answered[record_id] = self.transient_answered.get(record_id, 0) + 1
                return OnDemand(record_id, None)
        return None
