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


def with_alerts(
    ack_allowed: frozenset[str] | None = None, ack_technical: frozenset[str] = frozenset()
) -> tuple[Pipeline, str, str]:
    """A pipeline with an active low-reservoir alert on P0001 and the gateway's outbox_full."""
    p = Pipeline(
        AlertEngine(RulesConfig()),
        PointTags("site", "st"),
        ack_allowed=ack_allowed,
        ack_technical=ack_technical,
        session_id="s1",
    )
    batch = Batch()
    p.frames("line", NOW.timestamp(), frames(encode_message(reading(1, reservoir_ml=1.5))), batch)
    p.condition("outbox_full", True, "full", 10.0, 10.0, NOW.timestamp(), batch, high=True)
    (low,) = [t.alert_id for t in p.engine.active_alerts("P0001") if "low_reservoir" in t.alert_id]
    (full,) = [t.alert_id for t in p.engine.active_alerts("_gateway")]
    return p, low, full


def ack(alert_id: str, **fields: str) -> bytes:
    return json.dumps({"alert_id": alert_id, **fields}).encode()


LATER_S = NOW.timestamp() + 60


def test_malformed_or_unauthorised_acknowledgements_change_nothing() -> None:
    p, low, _ = with_alerts(ack_allowed=frozenset({"nurse"}))
    before = p.engine.state_rows()
    batch = Batch()
    refusals = [
        p.operator_ack("nurse", b"{not json", LATER_S, batch),
        p.operator_ack("mallory", ack(low), LATER_S, batch),
        p.operator_ack("nurse", ack("P0001:unknown:1"), LATER_S, batch),
        p.operator_ack("mallory", ack(low, by="nurse"), LATER_S, batch),
        p.operator_ack(None, ack(low, by="nurse"), LATER_S, batch),
        p.operator_ack("nurse", ack(low), LATER_S, batch, retained=True),
        p.operator_ack("nurse\x1b[2J", ack(low), LATER_S, batch),
    ]
    kinds = [r.reason_kind if r else None for r in refusals]
    assert kinds == [
        "invalid", "not_allowed", "unknown_alert", "by_mismatch", "legacy_topic", "retained",
        "bad_user",
    ]  # fmt: skip
    assert batch.records == []
    assert p.engine.state_rows() == before
    assert (p.counts.acks_in, p.counts.acks_rejected) == (0, 7)
    assert p.counts.acks_refused["unknown_alert"] == 1
    assert "{root}/ack/" in (refusals[4].reason if refusals[4] else "")


def test_the_acknowledging_identity_is_the_topic_user_and_at_is_the_receive_time() -> None:
    p, low, _ = with_alerts(ack_allowed=frozenset({"nurse"}))
    batch = Batch()
    claimed = "2000-01-01T00:00:00Z"  # before the alert started: bounded to its start
    assert p.operator_ack("nurse", ack(low, at=claimed), LATER_S, batch) is None
    (transition,) = [json.loads(r.payload) for r in batch.records if r.kind == "alert"]
    assert transition["phase"] == "acknowledged"
    assert transition["acknowledged_by"] == "nurse"
    assert datetime.fromisoformat(transition["at"]).timestamp() == LATER_S
    assert datetime.fromisoformat(transition["acknowledged_at"]) == NOW
    again = p.operator_ack("nurse", ack(low), LATER_S + 1, Batch())
    assert again is not None
    assert again.reason_kind == "already_acknowledged"


def test_a_claimed_time_in_the_future_is_bounded_to_the_receive_time() -> None:
    p, low, _ = with_alerts()
    batch = Batch()
    assert p.operator_ack("anyone", ack(low, at="2099-01-01T00:00:00Z"), LATER_S, batch) is None
    (transition,) = [json.loads(r.payload) for r in batch.records if r.kind == "alert"]
    assert datetime.fromisoformat(transition["acknowledged_at"]).timestamp() == LATER_S


def test_technical_alerts_need_the_technical_role() -> None:
    p, low, full = with_alerts(ack_allowed=frozenset({"nurse"}), ack_technical=frozenset({"tech"}))
    refused = p.operator_ack("nurse", ack(full), LATER_S, Batch())
    assert refused is not None
    assert refused.reason_kind == "technical_role"
    refused = p.operator_ack("tech", ack(low), LATER_S, Batch())
    assert refused is not None
    assert refused.reason_kind == "not_allowed"
    batch = Batch()
    assert p.operator_ack("tech", ack(full), LATER_S, batch) is None
    assert any(r.kind == "alert" and b'"acknowledged"' in r.payload for r in batch.records)


def test_retained_state_carries_the_session_and_an_increasing_seq() -> None:
    p, _, _ = with_alerts()
    batch = Batch()
    p.reassert(LATER_S, batch)
    state = [json.loads(r.payload) for r in batch.records]
    assert {s["kind"] for s in state} == {"pump_status", "active_alerts"}
    assert {s["session_id"] for s in state} == {"s1"}
    seqs = [s["seq"] for s in state]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert {s["pump_id"] for s in state if s["kind"] == "active_alerts"} == {"P0001", "_gateway"}
    later = Batch()
    p.reassert(LATER_S + 1, later)
    assert min(json.loads(r.payload)["seq"] for r in later.records) > max(seqs)
