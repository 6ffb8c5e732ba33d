"""Wire codec: golden frames, round trips, checksum and resynchronisation."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.codec import (
    ENVELOPE_FIELDS,
    MAX_FRAME_BYTES,
    MAX_GARBAGE_KEPT_BYTES,
    MODEL_BY_TYPE,
    TYPE_ACK,
    Frame,
    FrameDecoder,
    FrameError,
    MessageError,
    crc32_hex,
    encode_ack,
    encode_frame,
    encode_message,
    encode_payload,
    message_from_frame,
)
from schemas.models import (
    DeviceEvent,
    DeviceInfo,
    DeviceMessageModel,
    Reading,
)

DATA = Path(__file__).resolve().parent.parent / "data"
GOLDEN = json.loads((DATA / "golden_frames.json").read_text(encoding="ascii"))
GOLDEN_BYTES = (DATA / "golden_frames.pgw").read_bytes()
RESYNC = json.loads((DATA / "resync_vectors.json").read_text(encoding="ascii"))
RECEIVED_AT = datetime.fromisoformat(GOLDEN["received_at"])
MESSAGES = [entry for entry in GOLDEN["frames"] if entry["model"] is not None]
MODELS: dict[str, type[DeviceMessageModel]] = {
    "reading": Reading,
    "info": DeviceInfo,
    "event": DeviceEvent,
}


def crc32_by_the_book(data: bytes) -> int:
    """CRC-32/ISO-HDLC from its parameters: poly 0x04C11DB7 reflected, init and xorout all ones."""
    reflected_poly = 0xEDB88320  # 0x04C11DB7 with its bits reversed
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (reflected_poly if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def golden_message(entry: dict[str, Any]) -> DeviceMessageModel:
    return MODELS[entry["model"]].model_validate(entry["fields"])


def decode_all(stream: bytes) -> list[Frame | FrameError]:
    decoder = FrameDecoder()
    return [*decoder.feed(stream), *decoder.flush()]


def only_frame(stream: bytes) -> Frame:
    (result,) = decode_all(stream)
    assert isinstance(result, Frame), result
    return result


def only_error(stream: bytes) -> FrameError:
    (result,) = decode_all(stream)
    assert isinstance(result, FrameError), result
    return result


def summary(results: list[Frame | FrameError]) -> list[dict[str, Any]]:
    return [
        {"kind": "frame", "seq": r.seq}
        if isinstance(r, Frame)
        else {"kind": r.kind, "length": r.length}
        for r in results
    ]


def reading_frame(seq: int = 7) -> bytes:
    entry = next(e for e in MESSAGES if e["model"] == "reading")
    message = golden_message(entry).model_copy(update={"seq": seq})
    return encode_message(message)


# Checksum


def test_checksum_is_crc32_iso_hdlc_with_its_check_value() -> None:
    assert crc32_hex(b"123456789") == b"CBF43926"
    assert crc32_by_the_book(b"123456789") == 0xCBF43926
    assert GOLDEN["crc_check"]["crc32_iso_hdlc"] == "CBF43926"


@pytest.mark.parametrize("entry", GOLDEN["frames"], ids=lambda e: e["name"])
def test_golden_checksum_matches_an_independent_crc(entry: dict[str, Any]) -> None:
    raw = entry["frame"].encode("ascii")
    body = raw[1 : raw.rindex(b"*")]
    assert f"{crc32_by_the_book(body):08X}" == entry["checksum"]
    assert raw.endswith(entry["checksum"].encode("ascii") + b"\r\n")


# Golden frames


def test_golden_file_holds_the_golden_frames_in_order() -> None:
    expected = b"".join(entry["frame"].encode("ascii") for entry in GOLDEN["frames"])
    assert expected == GOLDEN_BYTES
    assert GOLDEN_BYTES.count(b"\r\n") == len(GOLDEN["frames"])


@pytest.mark.parametrize("entry", MESSAGES, ids=lambda e: e["name"])
def test_encoder_output_equals_golden_frame_byte_for_byte(entry: dict[str, Any]) -> None:
    assert encode_message(golden_message(entry)) == entry["frame"].encode("ascii")


def test_ack_encoder_output_equals_golden_frame() -> None:
    entry = next(e for e in GOLDEN["frames"] if e["name"] == "ack")
    header = entry["header"]
    encoded = encode_ack(header["pump_id"], header["boot_id"], header["seq"])
    assert encoded == entry["frame"].encode("ascii")


def test_decoder_splits_the_golden_file_into_its_frames() -> None:
    results = decode_all(GOLDEN_BYTES)
    assert all(isinstance(r, Frame) for r in results), results
    got = [
        {"version": r.version, "type": r.msg_type, "pump_id": r.pump_id, "boot_id": r.boot_id,
         "seq": r.seq}
        for r in results
        if isinstance(r, Frame)
    ]  # fmt: skip
    assert got == [entry["header"] for entry in GOLDEN["frames"]]
    assert [r.payload.decode("ascii") for r in results if isinstance(r, Frame)] == [
        entry["payload"] for entry in GOLDEN["frames"]
    ]


@pytest.mark.parametrize("entry", MESSAGES, ids=lambda e: e["name"])
def test_golden_frame_decodes_to_its_expected_fields(entry: dict[str, Any]) -> None:
    frame = only_frame(entry["frame"].encode("ascii"))
    message = message_from_frame(frame, RECEIVED_AT)
    assert message.model_dump(mode="json") == entry["fields"]
    assert message.received_at == RECEIVED_AT
    assert message.record_id == f"{frame.pump_id}:{frame.boot_id}:{frame.seq}"


def test_golden_info_frame_escapes_dollar_and_non_ascii() -> None:
    entry = next(e for e in MESSAGES if e["model"] == "info")
    raw = entry["frame"].encode("ascii")
    assert raw.count(b"$") == 1
    assert b"\\u0024" in raw
    assert b"\\u00b5" in raw
    message = message_from_frame(only_frame(raw), RECEIVED_AT)
    assert isinstance(message, DeviceInfo)
    assert "$" in message.firmware
    assert "µ" in message.firmware


def test_ack_frame_is_not_a_message_for_the_gateway() -> None:
    frame = only_frame(encode_ack("P0001", "3fa2c1d0", 9))
    assert frame.msg_type == TYPE_ACK
    assert frame.seq == 9
    with pytest.raises(MessageError, match="not sent to the gateway") as info:
        message_from_frame(frame, RECEIVED_AT)
    assert info.value.kind == "unexpected_type"


# Round trips


@pytest.mark.parametrize("entry", MESSAGES, ids=lambda e: e["name"])
def test_message_survives_encode_then_decode(entry: dict[str, Any]) -> None:
    message = golden_message(entry)
    decoded = message_from_frame(only_frame(encode_message(message)), message.received_at)
    assert decoded == message


def test_every_frame_type_of_a_device_message_round_trips() -> None:
    assert set(MODEL_BY_TYPE) == {"I", "R", "E"}
    kinds = {golden_message(e).kind for e in MESSAGES}
    assert kinds == {"info", "reading", "event"}


def test_payload_encoder_escapes_every_dollar() -> None:
    payload = encode_payload({"note": "$$ a $ b", "n": 1})
    assert b"$" not in payload
    assert json.loads(payload) == {"note": "$$ a $ b", "n": 1}


@pytest.mark.parametrize("payload", [b'{"a":"$"}', b'{"a":1}\n'])
def test_frame_encoder_refuses_payload_that_would_break_framing(payload: bytes) -> None:
    with pytest.raises(ValueError, match="must not contain"):
        encode_frame("R", "P0001", "b1", 1, payload)


# Resynchronisation


@pytest.mark.parametrize("vector", RESYNC["vectors"], ids=lambda v: v["name"])
def test_resync_vector_gives_its_expected_output(vector: dict[str, Any]) -> None:
    assert summary(decode_all(vector["stream"].encode("ascii"))) == vector["expect"]


@pytest.mark.parametrize("vector", RESYNC["vectors"], ids=lambda v: v["name"])
def test_resync_vector_gives_same_output_fed_byte_by_byte(vector: dict[str, Any]) -> None:
    stream = vector["stream"].encode("ascii")
    decoder = FrameDecoder()
    results: list[Frame | FrameError] = []
    for i in range(len(stream)):
        results += decoder.feed(stream[i : i + 1])
    assert summary([*results, *decoder.flush()]) == vector["expect"]


def test_decoder_resyncs_after_garbage_and_keeps_its_start() -> None:
    garbage = b"\x00\xffboot banner v2\r\n"
    garbage_error, frame = decode_all(garbage + reading_frame(seq=5))
    assert isinstance(garbage_error, FrameError)
    assert garbage_error.kind == "garbage"
    assert garbage_error.raw == garbage
    assert garbage_error.length == len(garbage)
    assert isinstance(frame, Frame)
    assert frame.seq == 5


def test_decoder_keeps_only_a_bounded_sample_of_long_garbage() -> None:
    garbage = b"x" * 10_000
    decoder = FrameDecoder()
    assert decoder.feed(garbage) == []
    assert decoder.buffered_bytes == MAX_GARBAGE_KEPT_BYTES
    (error,) = decoder.flush()
    assert error.kind == "garbage"
    assert error.length == 10_000
    assert error.raw == garbage[:MAX_GARBAGE_KEPT_BYTES]
    assert decoder.buffered_bytes == 0


def test_decoder_reports_truncated_frame_and_recovers_the_next() -> None:
    good = reading_frame(seq=8)
    truncated, frame = decode_all(good[:50] + good)
    assert isinstance(truncated, FrameError)
    assert truncated.kind == "truncated"
    assert truncated.raw == good[:50]
    assert isinstance(frame, Frame)
    assert frame.seq == 8


def test_decoder_reports_checksum_failure_with_both_values() -> None:
    good = reading_frame()
    bad = good.replace(b'"reservoir_ml":12.25', b'"reservoir_ml":19.25')
    error = only_error(bad)
    assert error.kind == "checksum"
    assert good[-10:-2].decode() in error.reason
    assert error.raw == bad


def test_decoder_skips_oversized_frame_without_holding_it() -> None:
    huge = b"$PGW1,R,P0001,b1,1,{" + b'"a":1,' * 2000 + b"}*00000000\r\n"
    decoder = FrameDecoder()
    results = decoder.feed(huge[:3000])
    assert results == []
    assert decoder.buffered_bytes <= MAX_FRAME_BYTES
    results = decoder.feed(huge[3000:] + reading_frame(seq=9))
    error, frame = results
    assert isinstance(error, FrameError)
    assert error.kind == "oversized"
    assert error.length == len(huge)
    assert len(error.raw) == MAX_FRAME_BYTES
    assert isinstance(frame, Frame)
    assert frame.seq == 9


def test_frame_of_exactly_max_bytes_is_accepted() -> None:
    overhead = len(encode_frame("E", "P0001", "b1", 1, b'{"p":""}'))
    payload = b'{"p":"' + b"x" * (MAX_FRAME_BYTES - overhead) + b'"}'
    frame_bytes = encode_frame("E", "P0001", "b1", 1, payload)
    assert len(frame_bytes) == MAX_FRAME_BYTES
    assert only_frame(frame_bytes).payload == payload
    longer = encode_frame("E", "P0001", "b1", 1, payload[:-2] + b'x"}')
    assert only_error(longer).kind == "oversized"


def test_oversized_run_ended_by_a_dollar_is_oversized_not_truncated() -> None:
    stream = b"$PGW1,R," + b"x" * (MAX_FRAME_BYTES * 2) + reading_frame(seq=3)
    error, frame = decode_all(stream)
    assert isinstance(error, FrameError)
    assert error.kind == "oversized"
    assert isinstance(frame, Frame)


def test_decoder_rejects_unsupported_protocol_version() -> None:
    body = b"PGW2,R,P0001,b1,1,{}"
    error = only_error(b"$" + body + b"*" + crc32_hex(body) + b"\r\n")
    assert error.kind == "unsupported_version"
    assert "protocol version 2 is not supported (supported: 1)" in error.reason


def test_decoder_rejects_unknown_message_type() -> None:
    body = b"PGW1,X,P0001,b1,1,{}"
    error = only_error(b"$" + body + b"*" + crc32_hex(body) + b"\r\n")
    assert error.kind == "unknown_type"
    assert "'X'" in error.reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"PGW1,R,P0001,b1,-1,{}", "sequence number"),
        (b"PGW1,R,P0001,b1,12345678901,{}", "sequence number"),
        (b"PGW,R,P0001,b1,1,{}", "protocol version"),
        (b"PGW99999,R,P0001,b1,1,{}", "protocol version"),
        (b"XYZ1,R,P0001,b1,1,{}", "header"),
    ],
)
def test_decoder_reports_malformed_header(body: bytes, reason: str) -> None:
    error = only_error(b"$" + body + b"*" + crc32_hex(body) + b"\r\n")
    assert error.kind == "malformed"
    assert reason in error.reason


def test_blank_lines_between_frames_are_not_garbage() -> None:
    stream = b"\r\n\n" + reading_frame(1) + b"\r\n\r\n" + reading_frame(2) + b"\n"
    assert summary(decode_all(stream)) == [{"kind": "frame", "seq": 1}, {"kind": "frame", "seq": 2}]


def test_garbage_length_does_not_depend_on_where_chunks_split() -> None:
    stream = b"junk\r\n" + reading_frame(1)
    whole = decode_all(stream)
    decoder = FrameDecoder()
    split = [*decoder.feed(stream[:4]), *decoder.feed(stream[4:5]), *decoder.feed(stream[5:])]
    assert split == whole
    assert isinstance(whole[0], FrameError)
    assert whole[0].length == 6


def test_decoder_accepts_frame_ending_in_bare_newline() -> None:
    frame = reading_frame(4)
    assert only_frame(frame[:-2] + b"\n").seq == 4


# Message validation errors


def frame_with(payload: bytes, msg_type: str = "R") -> Frame:
    return Frame(1, msg_type, "P0001", "b1", 1, payload, b"")


@pytest.mark.parametrize(
    ("payload", "kind", "text"),
    [
        (b"not json", "invalid_json", "payload is not JSON"),
        (b"[1, 2]", "invalid_json", "not a JSON object"),
        (b"\xff\xfe{}", "invalid_json", "payload is not JSON"),
        (b'{"seq": 5, "device_time": "2025-01-01T00:00:00Z"}', "invalid_message", "['seq']"),
        (b'{"device_time": "2025-01-01T00:00:00Z"}', "invalid_message", "drug: Field required"),
    ],
)
def test_bad_payload_raises_message_error_with_reason(payload: bytes, kind: str, text: str) -> None:
    with pytest.raises(MessageError) as info:
        message_from_frame(frame_with(payload), RECEIVED_AT)
    assert info.value.kind == kind
    assert text in info.value.reason


def test_header_identity_wins_and_payload_cannot_override_it() -> None:
    entry = next(e for e in MESSAGES if e["model"] == "event")
    frame = only_frame(entry["frame"].encode("ascii"))
    payload = json.loads(frame.payload)
    payload["pump_id"] = "OTHER"
    with pytest.raises(MessageError, match="repeats header fields"):
        message_from_frame(frame_with(json.dumps(payload).encode(), "E"), RECEIVED_AT)


def test_invalid_header_identity_is_a_message_error_naming_the_field() -> None:
    frame = Frame(1, "E", "bad pump id!", "b1", 1, b'{"device_time":"2025-01-01T00:00:00Z",'
                  b'"event":"eri"}', b"")  # fmt: skip
    with pytest.raises(MessageError, match="pump_id='bad pump id!'"):
        message_from_frame(frame, RECEIVED_AT)


def test_event_message_from_frame_checks_event_fields() -> None:
    payload = b'{"device_time":"2025-01-01T00:00:00Z","event":"refill","filled_ml":20.0}'
    with pytest.raises(MessageError, match="refill event needs withdrawn_ml and filled_ml"):
        message_from_frame(frame_with(payload, "E"), RECEIVED_AT)


@pytest.mark.parametrize(
    ("pump_id", "boot_id", "reason"),
    [
        ("P\xe9".encode("latin-1"), b"b1", "pump_id"),
        ("Pé".encode(), b"b1", "pump_id"),
        (b"P 1", b"b1", "pump_id"),
        (b"", b"b1", "pump_id"),
        (b"P" * 65, b"b1", "pump_id"),
        (b"P1", b"b-1", "boot_id"),
        (b"P1", b"", "boot_id"),
    ],
)
def test_header_ids_that_an_ack_could_not_echo_are_malformed(
    pump_id: bytes, boot_id: bytes, reason: str
) -> None:
    body = b"PGW1,R," + pump_id + b"," + boot_id + b",1,{}"
    error = only_error(b"$" + body + b"*" + crc32_hex(body) + b"\r\n")
    assert error.kind == "malformed"
    assert error.reason.startswith(reason)


@pytest.mark.parametrize(
    ("msg_type", "pump_id", "boot_id", "seq"),
    [("R", "P 1", "b1", 1), ("R", "P1", "b-1", 1), ("RR", "P1", "b1", 1), ("A", "P1", "b1", -1)],
)
def test_frame_encoder_refuses_a_header_it_cannot_frame(
    msg_type: str, pump_id: str, boot_id: str, seq: int
) -> None:
    with pytest.raises(ValueError, match="not"):
        encode_frame(msg_type, pump_id, boot_id, seq, b"{}")


# docs/protocol.md specifies every payload field and quotes the golden frames.

PROTOCOL_DOC = (DATA.parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("msg_type", sorted(MODEL_BY_TYPE))
def test_protocol_doc_lists_every_payload_field(msg_type: str) -> None:
    section = PROTOCOL_DOC.split(f"### `{msg_type}`:", 1)[1].split("\n### ", 1)[0]
    model = MODEL_BY_TYPE[msg_type]
    wire_fields = set(model.model_fields) - ENVELOPE_FIELDS
    missing = sorted(f for f in wire_fields if f"| `{f}` |" not in section)
    assert missing == []


@pytest.mark.parametrize("entry", GOLDEN["frames"], ids=lambda e: e["name"])
def test_protocol_doc_quotes_the_golden_frames_exactly(entry: dict[str, Any]) -> None:
    assert entry["frame"].rstrip("\r\n") + "\n" in PROTOCOL_DOC
