"""The shared message-sink driver over a real outbox: cursor, retry, poison isolation.

The transport here is a scripted implementation of our own Transport protocol (the receivers
are exercised for real in tests/integration/test_interop_sinks.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from gateway.adapters.delivery import (
    ACCEPTED,
    Answer,
    MessageSink,
    Outgoing,
    Pacing,
    Verdict,
)
from gateway.outbox import Outbox
from gateway.records import OutRecord, StoredRecord

PACING = Pacing(batch_rows=100, send_every_s=0.0, retry_initial_s=0.001, retry_max_s=0.002)


class PerRecord:
    """One message per 'reading' row (others skipped); splittable as asked."""

    def __init__(self, splittable: bool, per_message: int = 1) -> None:
        self.splittable = splittable
        self.per_message = per_message

    def encode(self, rows: Sequence[StoredRecord]) -> list[Outgoing]:
        chosen = [r for r in rows if r.kind == "reading"]
        n = self.per_message
        return [
            Outgoing(tuple(chosen[i : i + n]), b"|".join(r.payload for r in chosen[i : i + n]),
                     chosen[i].record_id)
            for i in range(0, len(chosen), n)
        ]  # fmt: skip


class Scripted:
    """Answers by payload: 'bad' is rejected, 'busy' answered RETRY twice."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.busy_left = 2

    def send(self, message: Outgoing) -> Answer:
        self.sent.append(message.body)
        if b"bad" in message.body:
            return Answer(Verdict.REJECTED, "refused: bad")
        if b"busy" in message.body and self.busy_left:
            self.busy_left -= 1
            return Answer(Verdict.RETRY, "busy")
        return ACCEPTED

    def close(self) -> None:
        pass


def outbox_with(tmp_path: Path, payloads: list[str]) -> Outbox:
    outbox = Outbox(tmp_path / "outbox.db", ["hl7"], durability="normal")
    records = [
        OutRecord("status" if p == "status" else "reading", f"id-{i}", "P1", p.encode())
        for i, p in enumerate(payloads)
    ]
    outbox.append(records)
    return outbox


Drained = tuple[Outbox, Scripted, list[tuple[str, str]], MessageSink]


def drain(tmp_path: Path, payloads: list[str], encoder: PerRecord) -> Drained:
    outbox = outbox_with(tmp_path, payloads)
    transport = Scripted()
    poisoned: list[tuple[str, str]] = []
    sink = MessageSink(
        "hl7", outbox, encoder, transport, PACING,
        on_poison=lambda name, row, reason, raw: poisoned.append((row.record_id, reason)),
    )  # fmt: skip
    sink.drain(threading.Event())
    return outbox, transport, poisoned, sink


def test_cursor_passes_every_row_and_skipped_kinds_once_all_are_accepted(tmp_path: Path) -> None:
    outbox, transport, poisoned, sink = drain(tmp_path, ["a", "status", "b"], PerRecord(False))
    assert transport.sent == [b"a", b"b"]
    assert outbox.cursor("hl7") == 3
    assert poisoned == []
    assert sink.health().delivered == 2
    outbox.close()


def test_a_retried_message_is_resent_unchanged_until_accepted(tmp_path: Path) -> None:
    outbox, transport, poisoned, sink = drain(tmp_path, ["a", "busy", "c"], PerRecord(False))
    assert transport.sent == [b"a", b"busy", b"busy", b"busy", b"c"]
    assert sink.health().counters["retries"] == 2
    assert poisoned == []
    outbox.close()


def test_an_unsplittable_rejected_message_is_quarantined_whole(tmp_path: Path) -> None:
    outbox, transport, poisoned, _ = drain(
        tmp_path, ["a", "bad", "c", "d"], PerRecord(False, per_message=2)
    )
    assert poisoned == [("id-0", "refused: bad"), ("id-1", "refused: bad")]
    assert transport.sent[-1] == b"c|d"
    assert outbox.cursor("hl7") == 4
    outbox.close()


def test_a_splittable_rejected_message_is_halved_until_one_record_is_quarantined(
    tmp_path: Path,
) -> None:
    outbox, _, poisoned, sink = drain(
        tmp_path, ["a", "b", "bad", "d", "e"], PerRecord(True, per_message=5)
    )
    assert poisoned == [("id-2", "refused: bad")]
    assert sink.health().delivered == 4
    assert sink.health().counters["poisoned"] == 1
    assert outbox.cursor("hl7") == 5
    outbox.close()


def _row(seq: int, kind: str, payload: bytes) -> StoredRecord:
    return StoredRecord(seq, kind, f"id-{seq}", "P", payload, None, False, 0.0)


def test_hl7_encoder_groups_readings_per_pump_and_interval_and_sends_alerts_alone() -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.adapters.mllp import Hl7Encoder, Hl7Settings
    from tests.unit.test_interop_messages import alert, reading

    t0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    rows: list[StoredRecord] = []
    for i in range(6):  # P0001 and P0002 interleaved, one reading a minute each
        for pump in ("P0001", "P0002"):
            model = reading(i, pump_id=pump, device_time=t0 + timedelta(minutes=i),
                            received_at=t0 + timedelta(minutes=i, seconds=1))  # fmt: skip
            rows.append(_row(len(rows) + 1, "reading", model.model_dump_json().encode()))
    rows.append(_row(len(rows) + 1, "pump_status", b"{}"))
    rows.append(_row(len(rows) + 1, "alert", alert("start").model_dump_json().encode()))
    settings = Hl7Settings(url="mllp://e:1", reading_interval_s=180, max_readings_per_message=2)
    messages = Hl7Encoder(settings, {}).encode(rows)
    groups = sorted(tuple(r.seq for r in m.rows) for m in messages)
    # 3-minute buckets [0, 3) and [3, 6) per pump, at most 2 readings each, the alert alone
    assert groups == [(1, 3), (2, 4), (5,), (6,), (7, 9), (8, 10), (11,), (12,), (14,)]
    alert_message = next(m for m in messages if m.rows[0].seq == 14)
    assert b"|ORU^R40^ORU_R40|" in alert_message.body
    assert all(b"|ORU^R01^ORU_R01|" in m.body for m in messages if m is not alert_message)


def test_a_stored_row_that_no_longer_validates_is_quarantined_unsent(tmp_path: Path) -> None:
    from gateway.adapters.mllp import Hl7Encoder, Hl7Settings
    from tests.unit.test_interop_messages import reading

    outbox = Outbox(tmp_path / "outbox.db", ["hl7"], durability="normal")
    good = reading(1)
    outbox.append([
        OutRecord("reading", "broken", "P1", b'{"kind": "reading", "pump_id": "P1"}'),
        OutRecord("reading", good.record_id, "P0001", good.model_dump_json().encode()),
    ])  # fmt: skip
    transport = Scripted()
    poisoned: list[tuple[str, str]] = []
    sink = MessageSink(
        "hl7", outbox, Hl7Encoder(Hl7Settings(url="mllp://e:1"), {}), transport, PACING,
        on_poison=lambda name, row, reason, raw: poisoned.append((row.record_id, reason)),
    )  # fmt: skip
    sink.drain(threading.Event())
    assert [rid for rid, _ in poisoned] == ["broken"]
    assert "no longer validates" in poisoned[0][1]
    assert len(transport.sent) == 1
    assert b"P0001:b1a2:1" in transport.sent[0]
    assert outbox.cursor("hl7") == 2
    outbox.close()
