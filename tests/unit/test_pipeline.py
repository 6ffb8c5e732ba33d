"""The pipeline: frames in, records out; quarantine, duplicates, acknowledgements, pseudonyms."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from gateway.pipeline import Batch, Pipeline, SeqWindow, ack_runs, pseudonym
from gateway.points import PointTags
from gateway.rules import AlertEngine, RulesConfig
from schemas.codec import FrameDecoder, encode_message
from schemas.models import DeviceInfo, Prescription, Reading

NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def reading(seq: int, reservoir_ml: float = 12.0, pump_id: str = "P0001") -> Reading:
    return Reading(
        pump_id=pump_id,
        boot_id="b1",
        seq=seq,
        device_time=NOW + timedelta(minutes=seq),
        received_at=NOW,
        drug="baclofen",
        pump_state="running",
        reservoir_ml=reservoir_ml,
        reservoir_capacity_ml=20.0,
        low_reservoir_alarm_ml=2.0,
        basal_rate_ml_per_day=0.5,
        delivered_total_ml=100.0 + seq * 0.01,
    )


def frames(*raw: bytes) -> list:  # type: ignore[type-arg]
    decoder = FrameDecoder()
    return [*decoder.feed(b"".join(raw)), *decoder.flush()]


def pipeline(key: bytes | None = None, ack_allowed: frozenset[str] | None = None) -> Pipeline:
    return Pipeline(
        AlertEngine(RulesConfig()),
        PointTags("site", "st"),
        pseudonymize_key=key,
        ack_allowed=ack_allowed,
    )


def test_accounting_frames_in_equals_accepted_plus_quarantined_plus_duplicates() -> None:
    p = pipeline()
    good = encode_message(reading(1))
    bad_crc = good.replace(b"running", b"runninG")
    batch = Batch()
    p.frames("line", NOW.timestamp() + 100, frames(b"noise", good, bad_crc, good), batch)
    c = p.counts
    assert (c.frames_in, c.accepted, sum(c.quarantined.values()), c.duplicates) == (4, 1, 2, 1)
    assert c.frames_in == c.accepted + sum(c.quarantined.values()) + c.duplicates
    assert dict(c.quarantined) == {"garbage": 1, "checksum": 1}
    kinds = [r.kind for r in batch.records]
    assert kinds.count("reading") == 1
    assert kinds.count("quarantine") == 2


def test_a_reading_is_stored_with_its_identity_payload_and_line() -> None:
    p = pipeline()
    batch = Batch()
    p.frames("line", NOW.timestamp() + 100, frames(encode_message(reading(7))), batch)
    record = next(r for r in batch.records if r.kind == "reading")
    assert record.record_id == "P0001:b1:7"
    assert json.loads(record.payload)["reservoir_ml"] == 12.0
    assert record.line is not None
    assert record.line.startswith(b"pump_reading")


def test_acknowledgements_cover_gap_free_runs_only() -> None:
    p = pipeline()
    batch = Batch()
    raw = [encode_message(reading(s)) for s in (1, 2, 3, 5, 6)]
    p.frames("line", NOW.timestamp() + 100, frames(*raw), batch)
    (seqs,) = batch.acks.values()
    assert ack_runs(seqs) == [(1, 3), (5, 6)]


def test_a_late_resend_of_a_lost_frame_is_stored_but_a_repeat_is_not() -> None:
    window = SeqWindow()
    assert [window.add(s) for s in (3, 4, 1, 1, 4)] == [True, True, True, False, False]
    assert window.add(0)
    assert window.add(2)
    assert (window.floor, window.above) == (4, set())  # the gap filled: nothing held above


def test_pseudonymised_pump_ids_and_serials_never_leave_in_clear() -> None:
    key = b"station-secret"
    p = pipeline(key=key)
    info = DeviceInfo(
        pump_id="P0001",
        boot_id="b1",
        seq=1,
        device_time=NOW,
        received_at=NOW,
        model="M",
        serial="SER123",
        firmware="1.0",
        reservoir_capacity_ml=20.0,
        drug="morphine",
        concentration_mg_per_ml=10.0,
        prescription=Prescription(basal_rate_ml_per_day=0.5),
    )
    batch = Batch()
    p.frames(
        "line",
        NOW.timestamp() + 100,
        frames(encode_message(info), encode_message(reading(2))),
        batch,
    )
    payloads = b" ".join(r.payload + (r.line or b"") for r in batch.records)
    assert b"P0001" not in payloads
    assert b"SER123" not in payloads
    assert pseudonym(key, "P0001").encode() in payloads
    (ack_key,) = batch.acks
    assert ack_key.pump_id == "P0001"  # the device is acknowledged under its own id


def test_malformed_or_unauthorised_acknowledgements_change_nothing() -> None:
    p = pipeline(ack_allowed=frozenset({"nurse"}))
    batch = Batch()
    assert "rejected" in (p.operator_ack(b"{not json", NOW.timestamp(), batch) or "")
    assert "allow-list" in (
        p.operator_ack(b'{"alert_id": "x", "by": "mallory"}', NOW.timestamp(), batch) or ""
    )
    assert p.operator_ack(b'{"alert_id": "unknown", "by": "nurse"}', NOW.timestamp(), batch) is None
    assert batch.records == []
    assert (p.counts.acks_in, p.counts.acks_rejected) == (1, 2)
