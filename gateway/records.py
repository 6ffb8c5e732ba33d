"""What the gateway stores and sends: the outbox record, its kinds, the gateway's own pump id.

Pure: the standard library only. The station pipeline builds these records, the ingest worker
admits them from the broker, the outbox stores them and every sink reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

GATEWAY_PUMP_ID: Final = "_gateway"
"""The pump id of the gateway's own technical alerts (outbox_full, outbox_near_full)."""

PUMP_KINDS: Final = frozenset({"reading", "info", "event", "alert", "active_alerts", "pump_status"})
"""Kinds of record about one pump."""
KINDS: Final = frozenset({*PUMP_KINDS, "gateway_status", "quarantine"})
"""Every kind of record the outbox holds."""
RETAINED_KINDS: Final = frozenset({"info", "pump_status", "active_alerts", "gateway_status"})
"""Kinds published retained: the current state a late subscriber needs."""
PRIORITY_KINDS: Final = frozenset({"alert", "active_alerts", "gateway_status", "pump_status"})
"""Kinds that may use the outbox's reserve once readings are refused (the alert that says
"full" must still be stored)."""


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record to store: a validated message as JSON, and its line protocol if it is a point."""

    kind: str
    record_id: str
    pump_id: str | None
    payload: bytes
    line: bytes | None = None
    retain: bool = False


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A committed row of the outbox."""

    seq: int
    kind: str
    record_id: str
    pump_id: str | None
    payload: bytes
    line: bytes | None
    retain: bool
    stored_at_s: float
