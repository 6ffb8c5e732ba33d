"""Property tests of the codec: any bytes in, no exception out, bounded memory, same output."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.codec import (
    MAX_FRAME_BYTES,
    MAX_GARBAGE_KEPT_BYTES,
    MODEL_BY_TYPE,
    Frame,
    FrameDecoder,
    FrameError,
    MessageError,
    _validate_parsed,
    encode_frame,
    encode_message,
    encode_payload,
    message_from_frame,
)
from schemas.models import BatteryState, Drug, PumpState, Reading, reserved_pump_id_problem

RECEIVED_AT = datetime(2025, 3, 1, 8, 0, 5, tzinfo=UTC)
PROPERTY_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(PROPERTY_SETTINGS, max_examples=400)
"""For the cheap properties: plain bytes, no frame building."""

# A small frame cap reaches the oversized paths with short inputs.
FRAME_CAPS = st.sampled_from([MAX_FRAME_BYTES, 64, 16])
# Bytes that steer the decoder into its edge cases far more often than uniform bytes would.
SPECIAL = st.sampled_from(
    [b"$", b"\n", b"\r\n", b"*", b"$PGW1,R,P1,b1,1,", b"*00000000\r\n", b"$" + b"x" * 40,
     b"x" * 700]
)  # fmt: skip
CHUNKS = st.lists(st.one_of(st.binary(max_size=64), SPECIAL), max_size=40)
GARBAGE = st.binary(max_size=80).map(lambda b: b.replace(b"$", b""))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
PUMP_IDS = st.from_regex(r"\A[A-Za-z0-9_.-]{1,12}\Z").filter(
    lambda pump_id: reserved_pump_id_problem(pump_id) is None
)
BOOT_IDS = st.from_regex(r"\A[0-9a-f]{1,8}\Z")


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    """A well-formed frame with an arbitrary JSON object payload (short enough to fit)."""
    fields = draw(st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5))
    payload = encode_payload(fields)
    frame = encode_frame(
        draw(st.sampled_from("IREA")),
        draw(PUMP_IDS),
        draw(BOOT_IDS),
        draw(st.integers(0, 2**32 - 1)),
        payload,
    )
    return frame if len(frame) <= MAX_FRAME_BYTES else encode_frame("R", "P1", "b1", 0, b"{}")


def feed_in_pieces(
    stream: bytes, cuts: list[int], max_frame_bytes: int = MAX_FRAME_BYTES
) -> list[Frame | FrameError]:
    decoder = FrameDecoder(max_frame_bytes)
    out: list[Frame | FrameError] = []
    edges = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for start, end in itertools.pairwise(edges):
        out += decoder.feed(stream[start:end])
    return [*out, *decoder.flush()]


@MANY
@given(CHUNKS, FRAME_CAPS)
def test_arbitrary_chunks_never_raise_and_memory_stays_bounded(
    chunks: list[bytes], max_frame_bytes: int
) -> None:
    decoder = FrameDecoder(max_frame_bytes)
    for chunk in chunks:
        for result in decoder.feed(chunk):
            assert isinstance(result, Frame | FrameError)
        assert decoder.buffered_bytes <= max_frame_bytes + 2 * MAX_GARBAGE_KEPT_BYTES
    decoder.flush()
    assert decoder.buffered_bytes == 0


@MANY
@given(CHUNKS)
def test_no_result_claims_more_bytes_than_were_fed(chunks: list[bytes]) -> None:
    results = feed_in_pieces(b"".join(chunks), [])
    claimed = sum(len(r.raw) if isinstance(r, Frame) else r.length for r in results)
    assert claimed <= sum(len(c) for c in chunks)
    for result in results:
        if isinstance(result, Frame):
            assert len(result.raw) <= MAX_FRAME_BYTES


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(GARBAGE, valid_frames()), min_size=1, max_size=8), GARBAGE)
def test_every_frame_embedded_in_garbage_is_recovered(
    pieces: list[tuple[bytes, bytes]], tail: bytes
) -> None:
    stream = b"".join(garbage + frame for garbage, frame in pieces) + tail
    frames = [r for r in feed_in_pieces(stream, []) if isinstance(r, Frame)]
    assert [f.raw for f in frames] == [frame for _, frame in pieces]


@PROPERTY_SETTINGS
@given(
    st.lists(st.one_of(valid_frames(), st.binary(max_size=64), SPECIAL), max_size=20),
    st.lists(st.integers(min_value=0), max_size=12),
    FRAME_CAPS,
)
def test_splitting_the_stream_anywhere_gives_the_same_output(
    pieces: list[bytes], cuts: list[int], max_frame_bytes: int
) -> None:
    stream = b"".join(pieces)
    whole = feed_in_pieces(stream, [], max_frame_bytes)
    assert feed_in_pieces(stream, cuts, max_frame_bytes) == whole


@PROPERTY_SETTINGS
@given(st.lists(st.one_of(valid_frames(), SPECIAL), max_size=20), FRAME_CAPS)
@example(pieces=[b"$", b"x" * 700, b"$"], max_frame_bytes=64)
@example(pieces=[b"garbage\r", b"\n", b"$"], max_frame_bytes=MAX_FRAME_BYTES)
def test_byte_by_byte_feeding_gives_the_same_output(
    pieces: list[bytes], max_frame_bytes: int
) -> None:
    stream = b"".join(pieces)
    every_byte = list(range(len(stream)))
    whole = feed_in_pieces(stream, [], max_frame_bytes)
    assert feed_in_pieces(stream, every_byte, max_frame_bytes) == whole


def assert_only_message_error(payload: bytes, msg_type: str = "R") -> None:
    frame = Frame(1, msg_type, "P0001", "b1", 1, payload, b"")
    try:
        message_from_frame(frame, RECEIVED_AT)
    except MessageError as exc:
        error = exc
    else:
        return
    assert error.reason
    assert error.frame is frame


@MANY
@given(st.binary(max_size=400), st.sampled_from("IREAZ"))
def test_arbitrary_payload_bytes_raise_only_message_error(payload: bytes, msg_type: str) -> None:
    assert_only_message_error(payload, msg_type)


@PROPERTY_SETTINGS
@given(st.dictionaries(st.text(max_size=24), JSON_VALUES, max_size=8), st.sampled_from("IRE"))
def test_arbitrary_json_objects_raise_only_message_error(
    fields: dict[str, object], msg_type: str
) -> None:
    assert_only_message_error(json.dumps(fields).encode(), msg_type)


READING_FIELD_NAMES = sorted(
    set(Reading.model_fields) - {"pump_id", "boot_id", "seq", "received_at"}
)


@PROPERTY_SETTINGS
@given(st.dictionaries(st.sampled_from(READING_FIELD_NAMES), JSON_VALUES, max_size=14))
def test_reading_fields_with_arbitrary_values_raise_only_message_error(
    fields: dict[str, object],
) -> None:
    assert_only_message_error(json.dumps(fields).encode(), "R")


@MANY
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", '{"a":', '{"alarms":[']))
@example(depth=990, opener="[")
@example(depth=1_000, opener='{"a":')
@example(depth=3_000, opener='{"alarms":[')
@example(depth=200_000, opener="[")
def test_deeply_nested_json_raises_only_message_error(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '{"alarms":[': "]}"}[opener]
    assert_only_message_error((opener * depth + "1" + closer * depth).encode())


@MANY
@given(
    st.integers(min_value=1, max_value=20_000),
    st.sampled_from(["reservoir_ml", "seq", "bolus_count_24h", "device_time"]),
    st.sampled_from(["{digits}", "-{digits}", "1e{digits}", "{digits}.5", "1e-{digits}"]),
)
def test_huge_numbers_raise_only_message_error(digits: int, field: str, shape: str) -> None:
    number = shape.format(digits="9" * digits)
    assert_only_message_error(f'{{"{field}":{number}}}'.encode())


@PROPERTY_SETTINGS
@given(
    reservoir=st.floats(min_value=0.0, max_value=20.0),
    rate=st.floats(min_value=0.0, max_value=100.0),
    delivered=st.floats(min_value=0.0, max_value=1_000_000.0),
    seq=st.integers(0, 2**32 - 1),
    offset_s=st.integers(-(10**8), 0),
    drug=st.sampled_from(Drug),
    state=st.sampled_from(PumpState),
    battery=st.sampled_from(BatteryState),
    pump_id=PUMP_IDS,
)
def test_any_valid_reading_round_trips_through_a_frame(
    reservoir: float,
    rate: float,
    delivered: float,
    seq: int,
    offset_s: int,
    drug: Drug,
    state: PumpState,
    battery: BatteryState,
    pump_id: str,
) -> None:
    reading = Reading(
        pump_id=pump_id, boot_id="b1", seq=seq,
        device_time=RECEIVED_AT + timedelta(seconds=offset_s), received_at=RECEIVED_AT,
        drug=drug, pump_state=state, reservoir_ml=reservoir, reservoir_capacity_ml=20.0,
        low_reservoir_alarm_ml=2.0, basal_rate_ml_per_day=rate, delivered_total_ml=delivered,
        battery_state=battery,
    )  # fmt: skip
    (frame,) = FrameDecoder().feed(encode_message(reading))
    assert isinstance(frame, Frame)
    assert message_from_frame(frame, RECEIVED_AT) == reading


def call_at_stack_depth(depth: int, payload: bytes) -> None:
    if depth:
        call_at_stack_depth(depth - 1, payload)
    else:
        assert_only_message_error(payload)


@pytest.mark.parametrize("stack_depth", [0, 300, 600])
def test_nesting_around_the_json_depth_limit_is_a_message_error_at_any_stack_depth(
    stack_depth: int,
) -> None:
    # pydantic formats a bad enum value with repr(), which recurses through the nesting.
    limit = sys.getrecursionlimit()
    for depth in range(limit - stack_depth - 60, limit - stack_depth + 5):
        payload = b'{"pump_state":' + b"[" * depth + b"]" * depth + b"}"
        call_at_stack_depth(stack_depth, payload)


def outcome(validate: Callable[[], object]) -> object:
    """A validation's result, or the kind of MessageError it raised."""
    try:
        return validate()
    except MessageError as exc:
        return exc.kind


def assert_fast_and_slow_paths_agree(payload: bytes, msg_type: str) -> None:
    frame = Frame(1, msg_type, "P0001", "b1", 1, payload, b"")
    model = MODEL_BY_TYPE[msg_type]
    fast = outcome(lambda: message_from_frame(frame, RECEIVED_AT))
    slow = outcome(lambda: _validate_parsed(model, frame, RECEIVED_AT))
    assert fast == slow


VALID_READING_PAYLOAD = {
    "device_time": "2025-03-01T08:00:00Z", "drug": "morphine", "pump_state": "running",
    "reservoir_ml": 12.5, "reservoir_capacity_ml": 20, "low_reservoir_alarm_ml": 2,
    "basal_rate_ml_per_day": 0.5, "delivered_total_ml": 10,
}  # fmt: skip
READING_VALUES = st.dictionaries(
    st.sampled_from(READING_FIELD_NAMES),
    JSON_VALUES | st.floats() | st.integers(-(2**70), 2**70) | st.floats(0, 20),
    max_size=3,
).map(lambda changes: VALID_READING_PAYLOAD | changes)


@PROPERTY_SETTINGS
@given(READING_VALUES)
def test_fast_and_slow_validation_agree_on_reading_fields(fields: dict[str, object]) -> None:
    assert_fast_and_slow_paths_agree(json.dumps(fields).encode(), "R")


def test_the_valid_reading_payload_is_valid() -> None:
    frame = Frame(1, "R", "P0001", "b1", 1, json.dumps(VALID_READING_PAYLOAD).encode(), b"")
    assert isinstance(message_from_frame(frame, RECEIVED_AT), Reading)


@PROPERTY_SETTINGS
@given(st.binary(max_size=200), st.sampled_from("IRE"))
@example(payload=b'{"reservoir_ml":1,"reservoir_ml":2}', msg_type="R")
@example(payload=b'{"model":"\\ud800"}', msg_type="I")
@example(payload=b'{"a":NaN}', msg_type="R")
@example(payload=b'{"a":1} trailing', msg_type="R")
@example(payload=b"{ }", msg_type="E")
@example(payload=b'{,"a":1}', msg_type="E")
@example(payload=b'{"firmware":"seq"}', msg_type="I")
def test_fast_and_slow_validation_agree_on_any_payload(payload: bytes, msg_type: str) -> None:
    assert_fast_and_slow_paths_agree(b"{" + payload, msg_type)
    assert_fast_and_slow_paths_agree(payload, msg_type)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"device_time":"2025-03-01T08:00:00Z","event":"eri"}',
        b'{"device_time":"2025-03-01T08:00:00Z","event":"eri","seq":2}',
        b'{"device_time":"2025-03-01T08:00:00Z","event":"eri","kind":"event"}',
        b'{"device_time":"2025-03-01T08:00:00Z","event":"refill","withdrawn_ml":true,'
        b'"filled_ml":"20"}',
    ],
)
def test_fast_and_slow_validation_agree_on_events(payload: bytes) -> None:
    assert_fast_and_slow_paths_agree(payload, "E")
