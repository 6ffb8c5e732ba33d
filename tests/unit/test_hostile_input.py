"""Hostile input on a serial line: floods are bounded, the header is the only identity,
reserved ids are refused, and a pseudonymising gateway's reasons hold no identifying value."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.alert_settings import RulesConfig
from gateway.pipeline import (
    QUARANTINE_BURST_RECORDS,
    QUARANTINE_RECORDS_PER_S,
    Batch,
    Pipeline,
    pseudonym,
)
from gateway.points import PointTags
from gateway.rules import AlertEngine
from schemas.codec import (
    MAX_FRAME_BYTES,
    MAX_GARBAGE_KEPT_BYTES,
    MAX_RUN_BYTES,
    RUN_ERRORS_REPORTED,
    Frame,
    FrameDecoder,
    FrameError,
    MessageError,
    crc32_hex,
    encode_frame,
    encode_payload,
    message_from_frame,
    parse_frame,
)
from schemas.models import Reading

RECEIVED_AT = datetime(2025, 3, 1, 8, 0, 5, tzinfo=UTC)
T0 = RECEIVED_AT.timestamp()
READING = {
    "device_time": "2025-03-01T08:00:00Z", "drug": "morphine", "pump_state": "running",
    "reservoir_ml": 12.5, "reservoir_capacity_ml": 20, "low_reservoir_alarm_ml": 2,
    "basal_rate_ml_per_day": 0.5, "delivered_total_ml": 10,
}  # fmt: skip


def good(seq: int, pump_id: str = "P0002") -> bytes:
    return encode_frame("R", pump_id, "b1", seq, encode_payload(READING))


def decode(stream: bytes, chunk: int = 65536) -> list[Frame | FrameError]:
    decoder = FrameDecoder()
    out: list[Frame | FrameError] = []
    for start in range(0, len(stream), chunk):
        out += decoder.feed(stream[start : start + chunk])
    return [*out, *decoder.flush()]


# --- floods -----------------------------------------------------------------------------------


def test_a_burst_of_dollars_is_a_few_errors_and_one_flood_per_mib_not_one_per_byte() -> None:
    burst = b"$" * (3 * MAX_RUN_BYTES + 5000)
    out = decode(burst + good(1))
    errors = [r for r in out if isinstance(r, FrameError)]
    assert [e.kind for e in errors[:RUN_ERRORS_REPORTED]] == ["truncated"] * RUN_ERRORS_REPORTED
    floods = [e for e in errors if e.kind == "flood"]
    assert [f.length for f in floods] == [MAX_RUN_BYTES] * 3 + [5000 - RUN_ERRORS_REPORTED]
    assert sum(f.count for f in floods) == len(burst) - RUN_ERRORS_REPORTED
    assert all(len(f.raw) <= MAX_GARBAGE_KEPT_BYTES for f in floods)
    assert isinstance(out[-1], Frame), "the next good frame still decodes"
    assert out[-1].seq == 1
    claimed = sum(e.length for e in errors)
    assert claimed == len(burst), "every byte is accounted for, once"


@pytest.mark.parametrize(
    "pattern",
    [b"$x", b"\n$", b"$PGW1,R,P1,b1,1,{}*00000000\r\n", b"\x00\xff$\n\r", b"$PGW" + b"A" * 3000],
)
def test_any_repeated_hostile_pattern_gives_a_bounded_number_of_errors(pattern: bytes) -> None:
    stream = pattern * (2 * MAX_RUN_BYTES // len(pattern))
    out = decode(stream + good(9))
    assert len(out) <= RUN_ERRORS_REPORTED + 2 * len(stream) // MAX_RUN_BYTES + 3
    assert isinstance(out[-1], Frame)
    claimed = sum(r.length for r in out if isinstance(r, FrameError))
    blank = stream.count(b"\r") + stream.count(b"\n")  # blank lines are not garbage
    assert len(stream) - blank <= claimed <= len(stream)


def test_a_good_frame_ends_the_flood_and_the_next_errors_are_reported_one_by_one() -> None:
    stream = b"$" * 100 + good(1) + b"$x" * 3 + good(2)
    kinds = [r.kind if isinstance(r, FrameError) else "frame" for r in decode(stream)]
    assert kinds == [
        *["truncated"] * RUN_ERRORS_REPORTED,
        "flood",
        "frame",
        *["truncated"] * 3,
        "frame",
    ]


def test_long_garbage_and_oversized_frames_are_reported_every_mib() -> None:
    garbage = bytes(random.Random(3).choice(b"abc\x00") for _ in range(2 * MAX_RUN_BYTES + 10))
    out = decode(garbage + b"$PGW" + b"A" * (MAX_RUN_BYTES * 2) + b"\n" + good(4))
    errors = [(r.kind, r.length) for r in out if isinstance(r, FrameError)]
    assert errors[:3] == [("garbage", MAX_RUN_BYTES)] * 2 + [("garbage", 10)]
    oversized = [r for r in out if isinstance(r, FrameError) and r.kind == "oversized"]
    assert [r.length for r in oversized] == [MAX_RUN_BYTES, MAX_RUN_BYTES, 5]
    assert isinstance(out[-1], Frame)


def test_idle_reports_the_flood_so_far_and_the_flood_goes_on() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(b"$" * 1000)
    assert len(out) == RUN_ERRORS_REPORTED
    (flood,) = decoder.idle()
    assert flood.kind == "flood"
    assert flood.length == 1000 - RUN_ERRORS_REPORTED - 1
    assert decoder.idle() == []
    assert decoder.feed(b"$$") == []
    assert [e.kind for e in decoder.flush()] == ["flood"]


FLOOD_PIECES = st.lists(
    st.one_of(
        st.sampled_from([b"$", b"$$$$$$$$$$", b"\n", b"\r\n", b"$PGW", b"$PG", b"x" * 300]),
        st.binary(max_size=40),
        st.just(good(5)),
        st.just(good(6)[:-5] + b"0000\r\n"),
    ),
    max_size=60,
)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(FLOOD_PIECES, st.lists(st.integers(min_value=0), max_size=12), st.integers(1, 4))
@example(pieces=[b"$" * 20, b"$P", b"GW"], cuts=[21, 22], repeat=1)
def test_floods_decode_the_same_however_the_stream_is_split(
    pieces: list[bytes], cuts: list[int], repeat: int
) -> None:
    stream = b"".join(pieces) * repeat
    edges = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    decoder = FrameDecoder()
    split: list[Frame | FrameError] = []
    for start, end in itertools.pairwise(edges):
        split += decoder.feed(stream[start:end])
        assert decoder.buffered_bytes <= MAX_FRAME_BYTES + 2 * MAX_GARBAGE_KEPT_BYTES
    split += decoder.flush()
    assert split == decode(stream)
    byte_by_byte = FrameDecoder()
    one: list[Frame | FrameError] = []
    for i in range(len(stream)):
        one += byte_by_byte.feed(stream[i : i + 1])
    assert [*one, *byte_by_byte.flush()] == split


# --- the header is the only identity ------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "pump\\u005fid",
        "\\u0070ump_id",
        "s\\u0065q",
        "received\\u005Fat",
        "boot_\\u0069d",
        "kin\\u0064",
        "schema_versio\\u006e",
    ],
)
def test_a_payload_repeating_a_header_field_in_any_spelling_is_rejected(key: str) -> None:
    payload = encode_payload(READING)[:-1] + f',"{key}":"VICTIM"}}'.encode()
    frame = parse_frame(encode_frame("R", "P0002", "b1", 7, payload))
    assert isinstance(frame, Frame)
    with pytest.raises(MessageError) as caught:
        message_from_frame(frame, RECEIVED_AT)
    assert caught.value.kind == "invalid_message"
    assert "payload repeats header fields" in caught.value.reason


def test_an_escaped_key_that_is_not_a_header_field_still_decodes() -> None:
    payload = encode_payload(READING).replace(b'"drug"', b'"dr\\u0075g"')
    frame = parse_frame(encode_frame("R", "P0002", "b1", 7, payload))
    assert isinstance(frame, Frame)
    message = message_from_frame(frame, RECEIVED_AT)
    assert isinstance(message, Reading)
    assert (message.pump_id, message.seq) == ("P0002", 7)


# --- reserved ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("pump_id", ["_gateway", "_", "_x1", ".", ".."])
def test_reserved_pump_ids_are_refused_in_the_header_and_by_the_model(pump_id: str) -> None:
    error = parse_frame(good(1, pump_id))
    assert isinstance(error, FrameError)
    assert error.kind == "malformed"
    assert "reserved" in error.reason
    with pytest.raises(ValueError, match="reserved"):
        Reading.model_validate({**READING, "pump_id": pump_id, "boot_id": "b", "seq": 1,
                                "received_at": RECEIVED_AT})  # fmt: skip


@pytest.mark.parametrize("pump_id", ["...", "a_", "P.1", "-x"])
def test_ids_that_only_look_like_reserved_ones_are_accepted(pump_id: str) -> None:
    assert isinstance(parse_frame(good(1, pump_id)), Frame)


# --- the pipeline: rate bound and pseudonymised reasons ---------------------------------------


def pipeline(key: bytes | None = None) -> Pipeline:
    return Pipeline(
        AlertEngine(RulesConfig()), PointTags(site="s", station="t"), pseudonymize_key=key
    )


def quarantine_records(batch: Batch) -> list[bytes]:
    return [r.payload for r in batch.records if r.kind == "quarantine"]


def test_quarantine_records_per_source_are_rate_bounded_and_the_rest_is_summarised() -> None:
    p = pipeline()
    sent = QUARANTINE_BURST_RECORDS + 450
    errors: list[Frame | FrameError] = [FrameError("checksum", "bad", b"$x", 2)] * sent
    batch = Batch()
    p.frames("hostile", T0, errors, batch)
    p.frames("healthy", T0, [FrameError("garbage", "g", b"g", 1)], batch)
    assert sum(p.counts.quarantined.values()) == sent + 1, "every item is counted"
    stored = quarantine_records(batch)
    assert len(stored) == QUARANTINE_BURST_RECORDS + 1, "the other source has its own bound"
    later = Batch()
    p.tick(T0 + 2 / QUARANTINE_RECORDS_PER_S, later)
    (summary,) = quarantine_records(later)
    assert b'"reason_kind":"rate_limited"' in summary
    assert b"450 more quarantined items" in summary
    assert b"checksum 450" in summary
    idle = Batch()
    p.tick(T0 + 10, idle)
    assert quarantine_records(idle) == [], "nothing held back: nothing to say"


def test_pseudonymised_reasons_never_carry_the_rejected_values() -> None:
    key = b"k" * 32
    p = pipeline(key)
    real_id, serial = "REAL-PUMP-17", "SER-REAL-17"
    info = {
        "device_time": "2025-03-01T08:00:00Z",
        "model": "m",
        "firmware": "f",
        "serial": serial + "x" * 80,  # too long: the reason would quote it
        "drug": "baclofen",
    }
    bad_info = encode_frame("I", real_id, "b1", 1, encode_payload(info))
    body = b"PGW1,R," + real_id.encode() + b"!,b1,2,{}"  # near-real id, not a valid one
    bad_header = b"$" + body + b"*" + crc32_hex(body) + b"\r\n"
    items = FrameDecoder().feed(bad_info + bad_header)
    assert [getattr(i, "kind", "frame") for i in items] == ["frame", "malformed"]
    batch = Batch()
    p.frames("line", T0, items, batch)
    stored = b"".join(quarantine_records(batch))
    assert len(quarantine_records(batch)) == 2
    assert real_id.encode() not in stored
    assert serial.encode() not in stored
    assert pseudonym(key, real_id).encode() in stored, "the pseudonym says which pump"
    assert b"serial" in stored, "the reason still names the field"
