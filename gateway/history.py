"""`pumpgw history`: a pump's recent readings and alerts from the local store, no server needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.outbox import Outbox
from gateway.records import StoredRecord

SHOWN_KINDS = ("reading", "event", "alert", "info")


def _summary(kind: str, data: dict[str, Any]) -> str:
    if kind == "reading":
        return (
            f"reservoir {data['reservoir_ml']:.2f} mL (pump estimate) "
            f"rate {data['basal_rate_ml_per_day']:.3f} mL/d "
            f"delivered {data['delivered_total_ml']:.2f} mL {data['pump_state']} "
            f"battery {data['battery_state']}"
        )
    if kind == "alert":
        return f"{data['priority']} {data['phase']} {data['alert_kind']}: {data['text']}"
    if kind == "event":
        extra = {k: data[k] for k in ("bolus_ml", "withdrawn_ml", "filled_ml") if data.get(k)}
        return f"{data['event']} {extra if extra else ''}".rstrip()
    return (
        f"{data.get('model', '')} firmware {data.get('firmware', '')} drug {data.get('drug', '')}"
    )


def _when(kind: str, data: dict[str, Any]) -> str:
    return str(data.get("device_time") or data.get("at") or "")[:19]


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (newline, ESC, OSC...) shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def render(records: list[StoredRecord], out: TextIO, as_json: bool) -> None:
    """One line per record; device and operator text can neither break the lines nor send
    escape sequences to the terminal (JSON escapes control characters itself)."""
    for record in reversed(records):
        if record.kind not in SHOWN_KINDS:
            continue
        data = json.loads(record.payload)
        if as_json:
            out.write(json.dumps({"kind": record.kind, **data}) + "\n")
        else:
            line = f"{_when(record.kind, data)}  {record.kind:<8} {_summary(record.kind, data)}"
            out.write(printable(line) + "\n")


def print_history(path: Path, pump_id: str, *, limit: int, as_json: bool) -> int:
    """Print the newest `limit` records of a pump, oldest first; 1 when the pump is unknown."""
    if not path.exists():
        print(f"no store at {path}", file=sys.stderr)
        return 1
    outbox = Outbox(path, [])
    try:
        records = outbox.history(pump_id, limit * 4)
    finally:
        outbox.close()
    shown = [r for r in records if r.kind in SHOWN_KINDS][:limit]
    if not shown:
        print(f"no records for pump {pump_id!r} in {path}", file=sys.stderr)
        return 1
    render(shown, sys.stdout, as_json)
    return 0
