"""Bad input through the whole pipeline: any bytes, every schema bound, hostile configs and acks.

The codec's own properties live in test_codec_properties.py; here the unit is what the
gateway does with the result (gateway.pipeline.Pipeline.frames into a Batch): nothing
escapes as an exception, every rejected frame becomes a Quarantined record whose reason a
person can read, the accounts balance, and memory stays bounded. Configuration and
operator acknowledgements get the same treatment: a clear error, no crash, no state change.

Optional coverage-guided fuzzing with atheris (not a test dependency):
`python -m tests.unit.test_fuzz [atheris options]` once `pip install atheris` worked.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, load_settings
from gateway.pipeline import Batch, Pipeline, pseudonym
from gateway.points import PointTags
from gateway.rules import AlertEngine, RulesConfig
from schemas.codec import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    crc32_hex,
    encode_frame,
    encode_message,
    encode_payload,
)
from schemas.models import (
    MODELS_BY_KIND,
    Acknowledgement,
    DeviceEvent,
    DeviceInfo,
    Frozen,
    Prescription,
    Quarantined,
    Reading,
)
from tests.e2e import write_config

RECEIVED = datetime(2026, 3, 1, 8, 0, 5, tzinfo=UTC)
RECEIVED_S = RECEIVED.timestamp()
DEVICE_TIME = "2026-03-01T08:00:00Z"
PUMP, BOOT = "P0001", "b00t1"
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)
REASON_MAX_CHARS = 1000
"""The pipeline keeps at most this much of a reason (gateway/pipeline.py _quarantine)."""
KNOWN_REASON_KINDS = frozenset(
    {
        "garbage",
        "flood",
        "rate_limited",
        "truncated",
        "oversized",
        "checksum",
        "malformed",
        "unsupported_version",
        "unknown_type",
        "unexpected_type",
        "invalid_json",
        "invalid_message",
    }
)
PIPELINE_GROWTH_MAX_BYTES = 512 * 1024
"""Python heap growth allowed while megabytes of hostile bytes pass through (warm-up excluded)."""

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
SPECIAL_BYTES = st.sampled_from(
    [b"$", b"\n", b"\r\n", b"*", b"$PGW1,R,P1,b1,1,", b"*00000000\r\n", b"\xff\xfe", b"x" * 900]
)


# --- helpers -------------------------------------------------------------------------------


def new_pipeline(key: bytes | None = None) -> Pipeline:
    return Pipeline(AlertEngine(RulesConfig()), PointTags("site", "st"), pseudonymize_key=key)


def push(pipeline: Pipeline, data: bytes, decoder: FrameDecoder | None = None) -> Batch:
    """Bytes through a decoder (flushed unless one is passed in) and the pipeline: one batch."""
    own = decoder is None
    decoder = decoder or FrameDecoder()
    items = [*decoder.feed(data), *(decoder.flush() if own else [])]
    batch = Batch()
    pipeline.frames("line-1", RECEIVED_S, items, batch)
    return batch


def quarantined(batch: Batch) -> list[Quarantined]:
    return [
        Quarantined.model_validate_json(r.payload) for r in batch.records if r.kind == "quarantine"
    ]


def assert_readable(reason: str) -> None:
    """A reason a person can read: one bounded printable line, no traceback, no repr noise."""
    assert reason, "empty reason"
    assert len(reason) <= REASON_MAX_CHARS
    assert reason.isprintable(), f"control characters in {reason!r}"
    assert "Traceback" not in reason
    assert not reason.startswith("Value error"), reason
    assert " object at 0x" not in reason, reason


def assert_consistent(pipeline: Pipeline, batch: Batch) -> None:
    """The accounts balance and every stored record validates against its model."""
    c = pipeline.counts
    assert c.frames_in == c.accepted + sum(c.quarantined.values()) + c.duplicates
    for record in batch.records:
        model: type[Frozen] = MODELS_BY_KIND[record.kind]
        model.model_validate_json(record.payload)
    for entry in quarantined(batch):
        assert entry.reason_kind in KNOWN_REASON_KINDS, entry.reason_kind
        assert_readable(entry.reason)
        assert len(entry.raw_hex) <= 2 * 4096
        bytes.fromhex(entry.raw_hex)


def frame(msg_type: str, fields: dict[str, Any], seq: int = 1) -> bytes:
    return encode_frame(msg_type, PUMP, BOOT, seq, encode_payload(fields))


def raw_frame(body: bytes) -> bytes:
    """A frame around any body, with a correct checksum (so the header is what is judged)."""
    return b"$" + body + b"*" + crc32_hex(body) + b"\r\n"


def only_outcome(data: bytes) -> tuple[Pipeline, Batch]:
    pipeline = new_pipeline()
    batch = push(pipeline, data)
    assert_consistent(pipeline, batch)
    assert pipeline.counts.frames_in == 1, "expected exactly one decoded item"
    return pipeline, batch


def rejection(data: bytes) -> Quarantined:
    """Exactly one item, quarantined: its Quarantined record."""
    pipeline, batch = only_outcome(data)
    (entry,) = quarantined(batch)
    assert pipeline.counts.accepted == 0
    assert bytes.fromhex(entry.raw_hex) == data[:4096] or entry.reason_kind == "oversized"
    return entry


def accepted(data: bytes) -> None:
    pipeline, batch = only_outcome(data)
    assert pipeline.counts.accepted == 1, [q.reason for q in quarantined(batch)]


# --- 1. any bytes --------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=200), SPECIAL_BYTES), max_size=30))
def test_any_bytes_through_the_pipeline_raise_nothing_and_balance_the_accounts(
    chunks: list[bytes],
) -> None:
    pipeline = new_pipeline()
    decoder = FrameDecoder()
    for chunk in chunks:
        batch = push(pipeline, chunk, decoder)
        assert_consistent(pipeline, batch)
        assert decoder.buffered_bytes <= MAX_FRAME_BYTES + 256
    tail = Batch()
    pipeline.frames("line-1", RECEIVED_S, list(decoder.flush()), tail)
    assert_consistent(pipeline, tail)


def valid_reading_fields(seq: int = 1) -> dict[str, Any]:
    return {
        "device_time": DEVICE_TIME,
        "drug": "baclofen",
        "pump_state": "running",
        "reservoir_ml": 12.5,
        "reservoir_capacity_ml": 20.0,
        "low_reservoir_alarm_ml": 2.0,
        "basal_rate_ml_per_day": 0.5,
        "delivered_total_ml": 100.0 + seq,
        "bolus_count_24h": 1,
        "battery_state": "ok",
        "battery_remaining_pct": 80.0,
        "alarms": [{"code": "low_reservoir", "priority": "PM"}],
    }


@FUZZ
@given(
    st.sampled_from(sorted(valid_reading_fields())),
    JSON_VALUES,
    st.booleans(),
)
def test_a_reading_with_any_value_in_any_field_is_accepted_only_if_the_model_accepts_it(
    field: str, value: object, drop: bool
) -> None:
    fields = valid_reading_fields()
    if drop:
        del fields[field]
    else:
        fields[field] = value
    data = frame("R", fields)
    if len(data) > MAX_FRAME_BYTES:
        return
    pipeline, batch = only_outcome(data)
    model_ok = True
    try:
        Reading.model_validate(
            {**fields, "pump_id": PUMP, "boot_id": BOOT, "seq": 1, "received_at": RECEIVED}
        )
    except ValueError:
        model_ok = False
    assert pipeline.counts.accepted == int(model_ok)
    if not model_ok:
        (entry,) = quarantined(batch)
        assert entry.reason_kind == "invalid_message"
        assert field in entry.reason, entry.reason


# --- 2. every schema bound, at and past it ---------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """One numeric bound of one field: the value at it (accepted) and just past it (rejected)."""

    msg_type: str
    path: tuple[str, ...]
    at: float | int
    past: float | int
    words: str


def base_fields(msg_type: str) -> dict[str, Any]:
    """A valid payload whose other fields leave room for any value of the field under test."""
    if msg_type == "R":
        return {
            **valid_reading_fields(),
            "reservoir_ml": 0.0,
            "reservoir_capacity_ml": 100.0,
            "low_reservoir_alarm_ml": 0.0,
        }
    if msg_type == "I":
        return {
            "device_time": DEVICE_TIME,
            "model": "SynchroMed II",
            "serial": "NGP123456",
            "firmware": "1.0",
            "reservoir_capacity_ml": 100.0,
            "drug": "morphine",
            "concentration_mg_per_ml": 10.0,
            "prescription": {"basal_rate_ml_per_day": 0.5, "low_reservoir_alarm_ml": 0.0},
        }
    return {
        "device_time": DEVICE_TIME,
        "event": "bolus_delivered",
        "bolus_ml": 0.1,
        "withdrawn_ml": 0.0,
        "filled_ml": 0.0,
    }


MODEL_FOR_TYPE: dict[str, type[Frozen]] = {"R": Reading, "I": DeviceInfo, "E": DeviceEvent}
ENVELOPE = frozenset({"pump_id", "boot_id", "seq", "received_at", "schema_version", "kind"})


def numeric_constraints(schema: dict[str, Any]) -> dict[str, Any]:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") in ("number", "integer"):
            return dict(option)
    return {}


def schema_bounds() -> list[Bound]:
    """Every numeric bound the exported JSON Schemas declare, nested models included."""
    bounds: list[Bound] = []
    for msg_type, model in MODEL_FOR_TYPE.items():
        schema = model.model_json_schema()
        fields: list[tuple[tuple[str, ...], Any]] = [
            ((name,), prop) for name, prop in schema["properties"].items()
        ]
        for name, prop in schema["properties"].items():
            ref = prop.get("$ref", "")
            if ref:
                nested = schema["$defs"][ref.rsplit("/", 1)[1]].get("properties", {})
                fields += [((name, sub), p) for sub, p in nested.items()]
        for path, prop in fields:
            if path[0] in ENVELOPE:
                continue
            bounds += bounds_of(msg_type, path, numeric_constraints(prop))
    return bounds


def bounds_of(msg_type: str, path: tuple[str, ...], c: dict[str, Any]) -> list[Bound]:
    if not c:
        return []
    integer = c["type"] == "integer"
    out = []
    for key, words in (
        ("minimum", "greater than or equal to"),
        ("exclusiveMinimum", "greater than"),
        ("maximum", "less than or equal to"),
    ):
        if key not in c:
            continue
        limit = c[key]
        down = key != "maximum"
        if integer:
            at, past = (limit, limit - 1) if down else (limit, limit + 1)
        elif key == "exclusiveMinimum":
            at, past = math.nextafter(float(limit), math.inf), float(limit)
        else:
            toward = -math.inf if down else math.inf
            at, past = float(limit), math.nextafter(float(limit), toward)
        shown = int(limit) if float(limit).is_integer() else limit
        out.append(Bound(msg_type, path, at, past, f"{words} {shown}"))
    return out


def with_value(msg_type: str, path: tuple[str, ...], value: float | int) -> dict[str, Any]:
    fields = base_fields(msg_type)
    target = fields
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return fields


BOUNDS = schema_bounds()
CROSS_FIELD = {
    ("R", ("low_reservoir_alarm_ml",), 100.0): "must be below reservoir_capacity_ml",
    ("I", ("prescription", "low_reservoir_alarm_ml"), 100.0): "must be below reservoir_capacity_ml",
}
"""At-bound values that a documented cross-field rule rejects (the alarm volume < capacity)."""


def test_the_bound_table_covers_every_numeric_field_of_the_device_messages() -> None:
    fields = {(b.msg_type, ".".join(b.path)) for b in BOUNDS}
    assert {
        ("R", "reservoir_ml"),
        ("R", "bolus_count_24h"),
        ("R", "battery_remaining_pct"),
    } <= fields
    assert {("I", "prescription.bolus_lockout_min"), ("I", "concentration_mg_per_ml")} <= fields
    assert {("E", "bolus_ml"), ("E", "withdrawn_ml"), ("E", "filled_ml")} <= fields
    assert len(BOUNDS) >= 30


@pytest.mark.parametrize(
    "bound", BOUNDS, ids=lambda b: f"{b.msg_type}-{'.'.join(b.path)}-{b.words.replace(' ', '_')}"
)
def test_a_value_at_a_schema_bound_is_accepted_and_one_just_past_it_is_quarantined_naming_it(
    bound: Bound,
) -> None:
    at_data = frame(bound.msg_type, with_value(bound.msg_type, bound.path, bound.at))
    cross = CROSS_FIELD.get((bound.msg_type, bound.path, bound.at))
    if cross is None:
        accepted(at_data)
    else:
        assert cross in rejection(at_data).reason
    entry = rejection(frame(bound.msg_type, with_value(bound.msg_type, bound.path, bound.past)))
    assert entry.reason_kind == "invalid_message"
    assert ".".join(bound.path) in entry.reason, entry.reason
    assert bound.words in entry.reason, entry.reason
    assert_readable(entry.reason)


@pytest.mark.parametrize(("field", "limit"), [("model", 64), ("firmware", 32), ("serial", 64)])
def test_a_string_at_its_length_bound_is_accepted_and_one_longer_is_quarantined(
    field: str, limit: int
) -> None:
    accepted(frame("I", {**base_fields("I"), field: "A" * limit}))
    entry = rejection(frame("I", {**base_fields("I"), field: "A" * (limit + 1)}))
    assert field in entry.reason
    assert str(limit) in entry.reason


def test_the_sequence_number_is_bounded_by_the_model_and_then_by_the_header() -> None:
    fields = base_fields("R")
    accepted(frame("R", fields, seq=2**32 - 1))
    entry = rejection(frame("R", fields, seq=2**32))
    assert (entry.reason_kind, "seq" in entry.reason) == ("invalid_message", True)
    assert "4294967295" in entry.reason
    body = b"PGW1,R,P0001,b00t1,99999999999," + encode_payload(fields)
    entry = rejection(raw_frame(body))
    assert (entry.reason_kind, entry.reason) == (
        "malformed",
        "sequence number is not an unsigned integer",
    )


@pytest.mark.parametrize(
    ("device_time", "ok"),
    [
        ("2000-01-01T00:00:00Z", True),
        ("1999-12-31T23:59:59.999999Z", False),
        ((RECEIVED + timedelta(days=1)).isoformat(), True),
        ((RECEIVED + timedelta(days=1, microseconds=1)).isoformat(), False),
    ],
)
def test_device_time_bounds_are_a_day_ahead_of_the_gateway_and_not_before_2000(
    device_time: str, ok: bool
) -> None:
    data = frame("R", {**base_fields("R"), "device_time": device_time})
    if ok:
        accepted(data)
    else:
        entry = rejection(data)
        assert "device_time" in entry.reason
        assert "clock is not set" in entry.reason or "ahead of received_at" in entry.reason


# --- 3. named kinds of bad input, each with the reason a person gets -----------------------

GOOD = base_fields("R")
NESTED = b'{"alarms":' + b"[" * 900 + b"]" * 900 + b"}"


def reading_with(**changes: Any) -> bytes:
    """A reading frame: GOOD with some fields changed (None becomes JSON null)."""
    return frame("R", {**GOOD, **changes})


def reading_payload(payload: bytes) -> bytes:
    return encode_frame("R", PUMP, BOOT, 1, payload)


WITHOUT_DRUG = frame("R", {k: v for k, v in GOOD.items() if k != "drug"})
BAD_INPUT: list[tuple[str, bytes, str, str]] = [
    ("oversized frame", reading_with(pad="x" * 3000), "oversized", "longer than 2048"),
    ("huge JSON (1 MB)", frame("R", {"a": ["y" * 64] * 15000}), "oversized", "skipped to the"),
    ("invalid UTF-8", reading_payload(b'{"drug":"\xff\xfe"}'), "invalid_json", "not JSON"),
    ("invalid UTF-8 in the pump id", raw_frame(b"PGW1,R,P\xff01,b1,1,{}"), "malformed", "pump_id"),
    ("deeply nested JSON", reading_payload(NESTED), "invalid_message", "alarms"),
    ("400 digits", reading_payload(b'{"reservoir_ml":' + b"9" * 400 + b"}"), "invalid_message",
     "reservoir_ml"),
    ("exponent past float range", reading_payload(b'{"reservoir_ml":1e999}'), "invalid_message",
     "reservoir_ml"),
    ("NaN", reading_payload(b'{"reservoir_ml":NaN}'), "invalid_message", "reservoir_ml"),
    ("a number as a string", reading_with(reservoir_ml="12.5"), "invalid_message", "valid number"),
    ("a boolean as a number", reading_with(bolus_count_24h=True), "invalid_message", "bolus_count"),
    ("null for a required field", reading_with(drug=None), "invalid_message", "drug"),
    ("an unknown field", reading_with(dose_mg=1.0), "invalid_message", "dose_mg"),
    ("a missing field", WITHOUT_DRUG, "invalid_message", "drug: Field required"),
    ("an unknown drug", reading_with(drug="heroin"), "invalid_message", "'morphine'"),
    ("an unknown schema version", reading_with(schema_version=2), "invalid_message",
     "schema_version"),
    ("not an object", reading_payload(b"[1,2]"), "invalid_json", "not a JSON object"),
    ("not JSON", reading_payload(b"{reservoir: 1}"), "invalid_json", "payload is not JSON"),
    ("an empty payload", reading_payload(b""), "invalid_json", "payload is not JSON"),
    ("an unknown message type", raw_frame(b"PGW1,X,P0001,b1,1,{}"), "unknown_type",
     "unknown message type 'X'"),
    ("an ack sent to the gateway", encode_frame("A", PUMP, BOOT, 1, b"{}"), "unexpected_type",
     "not sent to the gateway"),
    ("protocol version 2", raw_frame(b"PGW2,R,P0001,b1,1,{}"), "unsupported_version",
     "version 2 is not supported (supported: 1)"),
    ("a 40-digit version", raw_frame(b"PGW" + b"9" * 40 + b",R,P1,b1,1,{}"), "malformed",
     "not a small number"),
    ("a flipped bit", frame("R", GOOD).replace(b"baclofen", b"baclofeN"), "checksum",
     "CRC-32 mismatch"),
    ("no checksum", b"$PGW1,R,P0001,b1,1,{}\r\n", "malformed", "8-digit checksum"),
    ("control characters as checksum", b"$PGW1,R,P1,b1,1,{}*\x1b[2J\x07\x00\r\x00\r\n",
     "checksum", "frame says \\x1b[2J\\x07\\x00\\r\\x00,"),
    ("a cut frame", frame("R", GOOD)[:60] + b"\r", "truncated", "truncated frame"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "kind", "phrase"),
    [pytest.param(d, k, p, id=name) for name, d, k, p in BAD_INPUT],
)
def test_bad_input_lands_in_quarantine_with_a_reason_a_person_understands(
    data: bytes, kind: str, phrase: str
) -> None:
    entry = rejection(data)
    assert entry.reason_kind == kind, entry.reason
    assert phrase in entry.reason, entry.reason
    assert_readable(entry.reason)
    assert entry.source == "line-1"


def test_garbage_between_good_frames_is_quarantined_once_and_the_frames_are_kept() -> None:
    pipeline = new_pipeline()
    data = frame("R", GOOD, 1) + b"\x00\xffnoise\x07" * 50 + frame("R", GOOD, 2)
    batch = push(pipeline, data)
    assert_consistent(pipeline, batch)
    (entry,) = quarantined(batch)
    assert (entry.reason_kind, entry.reason) == ("garbage", "400 bytes outside any frame")
    assert pipeline.counts.accepted == 2


def test_a_point_the_database_refuses_keeps_the_frame_accounts_balanced() -> None:
    pipeline = new_pipeline()
    push(pipeline, frame("R", GOOD))
    batch = Batch()
    pipeline.poisoned_point(
        f"{PUMP}:{BOOT}:1", b"pump_reading x=1", "HTTP 400: no", RECEIVED_S, batch
    )
    assert [r.kind for r in batch.records] == ["quarantine"], "the refusal must still be kept"
    c = pipeline.counts
    assert c.frames_in == c.accepted + sum(c.quarantined.values()) + c.duplicates


# --- 4. memory stays bounded -----------------------------------------------------------------


def hostile_stream(rng: random.Random, chunks: int) -> Iterator[bytes]:
    """64 KiB chunks: random bytes, endless frames, deep JSON, resent valid frames."""
    nested = encode_frame("R", PUMP, BOOT, 3, NESTED)
    valid = [frame("R", valid_reading_fields(s), seq=s) for s in range(1, 40)]
    for i in range(chunks):
        shape = i % 4
        if shape == 0:
            yield rng.randbytes(65536)
        elif shape == 1:
            yield b"$PGW1,R," + b"9" * 65528
        elif shape == 2:
            yield (nested * (65536 // len(nested) + 1))[:65536]
        else:
            yield b"".join(rng.choice(valid) for _ in range(150))


def test_megabytes_of_hostile_bytes_keep_decoder_and_pipeline_memory_bounded() -> None:
    rng = random.Random(20261125)
    pipeline = new_pipeline()
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        warm = list(hostile_stream(rng, 16))
        for chunk in warm:
            push(pipeline, chunk, decoder)
        start_bytes, _ = tracemalloc.get_traced_memory()
        fed = 0
        for chunk in hostile_stream(rng, 96):
            push(pipeline, chunk, decoder)
            fed += len(chunk)
            assert decoder.buffered_bytes <= MAX_FRAME_BYTES + 256
        end_bytes, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    c = pipeline.counts
    assert fed >= 6_000_000
    assert c.frames_in == c.accepted + sum(c.quarantined.values()) + c.duplicates
    assert c.duplicates > 0
    assert sum(c.quarantined.values()) > 1000
    growth = end_bytes - start_bytes
    assert growth < PIPELINE_GROWTH_MAX_BYTES, f"heap grew {growth} bytes over {fed} bytes fed"


# --- 5. pseudonymisation must cover what quarantine keeps -------------------------------------

KEY = b"k" * 32


def test_a_quarantined_frame_does_not_reveal_the_real_pump_id_when_pseudonymising() -> None:
    pipeline = new_pipeline(KEY)
    bad = frame("I", {**base_fields("I"), "concentration_mg_per_ml": 1000.0})
    batch = push(pipeline, bad)
    (entry,) = quarantined(batch)
    assert entry.pump_id == pseudonym(KEY, PUMP)
    published = entry.model_dump_json()
    for secret in (PUMP, "NGP123456"):
        assert secret not in published
        assert secret.encode().hex() not in published


def test_an_accepted_frame_carries_only_pseudonyms_when_pseudonymising() -> None:
    pipeline = new_pipeline(KEY)
    batch = push(pipeline, frame("I", base_fields("I")) + frame("R", GOOD, 2))
    assert pipeline.counts.accepted == 2
    for record in batch.records:
        text = record.payload.decode() + (record.line or b"").decode() + record.record_id
        assert PUMP not in text, record.kind
        assert "NGP123456" not in text, record.kind
        assert record.pump_id in (None, pseudonym(KEY, PUMP))


# --- 6. malformed configuration --------------------------------------------------------------

KNOWN_KEYS: dict[str, list[str]] = {
    "gateway": ["site", "station", "status_interval_s", "ack_allowed", "pseudonymize_key_file"],
    "mqtt": ["url", "protocol", "keepalive_s", "inflight_max", "password_file", "topic_prefix",
             "replay_rate_per_s", "reconnect_max_s", "tls"],
    "store": ["path", "durability", "max_pending_records", "warn_at_fraction", "retention_days"],
    "health": ["listen", "max_backlog_age_s"],
    "influx": ["url", "api", "org", "bucket", "token_file", "batch_size", "timeout_s"],
    "alerts": ["telemetry_lost_after_s"],
}  # fmt: skip
TOML_SCALARS = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.text(max_size=30)
    | st.sampled_from(["", "mqtt://", "mqtts://h:0", "/dev/null", "127.0.0.1:99999", "-1", "5"])
)
TOML_VALUES = (
    TOML_SCALARS
    | st.lists(TOML_SCALARS, max_size=3)
    | st.dictionaries(
        st.sampled_from(["ca_file", "insecure_skip_verify", "x"]), TOML_SCALARS, max_size=2
    )
)
SECTIONS = st.dictionaries(
    st.sampled_from(sorted(KNOWN_KEYS)),
    st.just(None),
    min_size=1,
    max_size=3,
).flatmap(
    lambda names: st.fixed_dictionaries(
        {
            name: st.dictionaries(st.sampled_from(KNOWN_KEYS[name]), TOML_VALUES, max_size=3)
            for name in names
        }
    )
)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def assert_config_error_names_keys(exc: ConfigError, path: Path, sections: set[str]) -> None:
    assert exc.problems, "a ConfigError without problems"
    for problem in exc.problems:
        head = problem.split(":", 1)[0]
        assert head.split(".")[0] in sections or head == str(path), problem
        assert problem.isprintable() or "\n" not in problem.split(": ", 1)[0], problem


@FUZZ
@given(SECTIONS)
def test_malformed_values_for_known_keys_give_a_config_error_naming_the_key(
    sections: dict[str, dict[str, Any]],
) -> None:
    with scratch_dir() as tmp:
        path = write_config(tmp / "pumpgw.toml", sections)
        try:
            load_settings(path)
        except ConfigError as exc:
            assert_config_error_names_keys(exc, path, set(sections) | {"sources"})


@FUZZ
@given(
    st.sampled_from([(s, k) for s, keys in KNOWN_KEYS.items() for k in keys if s != "influx"]),
    st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40
    ),
)
def test_malformed_environment_values_give_a_config_error_naming_the_key(
    key: tuple[str, str], value: str
) -> None:
    name = f"PUMPGW_{key[0].upper()}__{key[1].upper()}"
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        with scratch_dir() as tmp:
            path = write_config(tmp / "pumpgw.toml", {"health": {"listen": ""}})
            try:
                loaded = load_settings(path)
            except ConfigError as exc:
                assert_config_error_names_keys(exc, path, {key[0]})
            else:  # the variable was taken: it must have overridden the file or a default
                assert loaded.health.listen == ("" if key != ("health", "listen") else value)
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def test_a_config_file_that_is_not_toml_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "pumpgw.toml"
    path.write_bytes(b"\xff\xfe[gateway\x00")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: cannot read it as TOML")


# --- 7. malformed operator acknowledgements ---------------------------------------------------


def pipeline_with_a_latched_alert() -> tuple[Pipeline, str]:
    """A pump whose reservoir fell below its alarm volume: an active, latching alert."""
    pipeline = new_pipeline()
    low = Reading.model_validate(
        {**valid_reading_fields(), "reservoir_ml": 1.0, "pump_id": PUMP, "boot_id": BOOT, "seq": 1,
         "received_at": RECEIVED, "alarms": []}
    )  # fmt: skip
    info = DeviceInfo(
        pump_id=PUMP, boot_id=BOOT, seq=0, device_time=low.device_time, received_at=RECEIVED,
        model="m", serial="s1", firmware="f", reservoir_capacity_ml=20.0, drug="baclofen",
        concentration_mg_per_ml=0.5, prescription=Prescription(basal_rate_ml_per_day=0.5),
    )  # fmt: skip
    batch = push(pipeline, encode_message(info) + encode_message(low))
    alerts = [json.loads(r.payload) for r in batch.records if r.kind == "alert"]
    assert alerts, "the fixture reading raised no alert"
    return pipeline, str(alerts[0]["alert_id"])


ACK_PAYLOADS = (
    st.binary(max_size=300)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {"alert_id": JSON_VALUES, "by": JSON_VALUES},
        optional={"at": JSON_VALUES, "note": JSON_VALUES, "schema_version": JSON_VALUES},
    ).map(lambda v: json.dumps(v).encode())
)


@FUZZ
@given(ACK_PAYLOADS)
def test_a_malformed_acknowledgement_is_refused_clearly_and_changes_no_state(
    payload: bytes,
) -> None:
    pipeline, _alert_id = pipeline_with_a_latched_alert()
    before = pipeline.engine.state_rows()
    batch = Batch()
    refusal = pipeline.operator_ack("nurse.jones", payload, RECEIVED_S + 1, batch)
    try:
        ack = Acknowledgement.model_validate_json(payload)
    except ValueError:
        ack = None
    if ack is None:
        assert refusal is not None
        assert refusal.reason_kind == "invalid"
        assert_readable(refusal.reason[:REASON_MAX_CHARS])
        assert pipeline.counts.acks_rejected == 1
    assert batch.records == [], "an acknowledgement of no known alert stored something"
    assert pipeline.engine.state_rows() == before


def test_a_valid_acknowledgement_of_a_known_alert_is_recorded_with_who() -> None:
    pipeline, alert_id = pipeline_with_a_latched_alert()
    batch = Batch()
    ack = Acknowledgement(alert_id=alert_id, by="nurse.jones")
    payload = ack.model_dump_json().encode()
    assert pipeline.operator_ack("nurse.jones", payload, RECEIVED_S + 1, batch) is None
    (transition,) = [json.loads(r.payload) for r in batch.records if r.kind == "alert"]
    assert (transition["phase"], transition["acknowledged_by"]) == ("acknowledged", "nurse.jones")


# --- optional: coverage-guided fuzzing with atheris -------------------------------------------


def atheris_one_input(data: bytes) -> None:
    """The atheris target: split the input into two chunks, push both, check the invariants."""
    pipeline = new_pipeline()
    decoder = FrameDecoder()
    cut = data[0] if data else 0
    for chunk in (data[1 : 1 + cut], data[1 + cut :]):
        assert_consistent(pipeline, push(pipeline, chunk, decoder))
    pipeline.operator_ack("nurse.jones", data, RECEIVED_S, Batch())


def main() -> None:  # pragma: no cover - a manual tool, see the module docstring
    atheris = importlib.import_module("atheris")
    atheris.instrument_all()  # coverage feedback for everything already imported
    atheris.Setup(sys.argv, atheris_one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    main()
