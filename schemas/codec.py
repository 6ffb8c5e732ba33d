"""The serial wire protocol: framing, checksum and an incremental decoder.

Pure: no I/O, no clock. Specified in docs/protocol.md. A frame is one ASCII line:

    $PGW1,R,P0001,3fa2c1d0,42,{"device_time":...}*1A2B3C4D\\r\\n

`$` starts a frame and never appears inside one (the encoder escapes it in JSON
as \\u0024); `\\n` ends it. The checksum is CRC-32/ISO-HDLC (zlib.crc32) of the
bytes between `$` and `*`, as 8 upper-case hex digits.

Resynchronisation: outside a frame, bytes up to the next `$` are garbage
(reported once per run; blank lines are not garbage). A `$` inside a frame means
the frame was truncated: it is reported and a new frame starts there. A frame
that grows past MAX_FRAME_BYTES is reported as oversized and the rest of it is
skipped up to the next `$` or `\\n`.

Floods: between two good frames the first RUN_ERRORS_REPORTED errors are reported one by
one; after that every byte up to the next good frame is a flood, reported as one `flood`
error per MAX_RUN_BYTES (and before the next good frame) with its byte count, its count of
`$` and a sample. In a flood only `$PGW` can start a frame, so hostile input (a burst of `$`,
each one a truncated frame) costs one report per MiB and runs at memory speed. A garbage
run or an oversized frame longer than MAX_RUN_BYTES is reported in MAX_RUN_BYTES pieces.
The decoder never holds more than MAX_FRAME_BYTES of a frame plus 2 * MAX_GARBAGE_KEPT_BYTES
of samples, and its output does not depend on how the input was split into chunks.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from schemas.models import (
    BOOT_ID_PATTERN,
    PUMP_ID_PATTERN,
    DeviceEvent,
    DeviceInfo,
    DeviceMessageModel,
    Reading,
    describe_errors,
    reserved_pump_id_problem,
)

PROTOCOL_VERSION: Final = 1
SUPPORTED_PROTOCOL_VERSIONS: Final = frozenset({1})
MAX_FRAME_BYTES: Final = 2048
"""Longest frame, from `$` to `\\n` inclusive."""
MAX_GARBAGE_KEPT_BYTES: Final = 256
"""How much of a garbage run (or of a flood) is kept for quarantine; the rest is only counted."""
RUN_ERRORS_REPORTED: Final = 8
"""Errors reported one by one between two good frames; later ones are coalesced (a flood)."""
MAX_RUN_BYTES: Final = 1 << 20
"""A flood, a garbage run or an oversized frame is reported at least once per MiB."""
MAX_HEADER_SEQ: Final = 9_999_999_999
"""Ten digits fit the header; the models then limit seq to 2**32 - 1."""
MAX_VERSION_DIGITS: Final = 4
"""Longer version fields are malformed (keeps int() away from huge digit strings)."""
BLANK: Final = b"\r\n"

START: Final = b"$"
END: Final = b"\n"
MAGIC: Final = b"PGW"

TYPE_INFO: Final = "I"
TYPE_READING: Final = "R"
TYPE_EVENT: Final = "E"
TYPE_ACK: Final = "A"
"""Gateway to device: every frame of this pump and boot up to `seq` is stored durably."""
MODEL_BY_TYPE: Final[dict[str, type[DeviceMessageModel]]] = {
    TYPE_INFO: DeviceInfo,
    TYPE_READING: Reading,
    TYPE_EVENT: DeviceEvent,
}
TYPE_BY_KIND: Final = {"info": TYPE_INFO, "reading": TYPE_READING, "event": TYPE_EVENT}
_PUMP_ID: Final = re.compile(PUMP_ID_PATTERN.replace("$", r"\Z"))
_BOOT_ID: Final = re.compile(BOOT_ID_PATTERN.replace("$", r"\Z"))
ENVELOPE_FIELDS: Final = frozenset(
    {"schema_version", "kind", "pump_id", "boot_id", "seq", "received_at"}
)


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame whose framing and checksum are good; the payload is still unvalidated JSON."""

    version: int
    msg_type: str
    pump_id: str
    boot_id: str
    seq: int
    payload: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class FrameError:
    """Bytes that are not a good frame, with a machine kind and a human reason.

    Kinds: garbage, truncated, oversized, checksum, malformed, unsupported_version,
    unknown_type, and flood (`count` errors of those kinds coalesced; `raw` is a sample).
    """

    kind: str
    reason: str
    raw: bytes
    length: int
    count: int = 1


class MessageError(ValueError):
    """A good frame whose payload is not a valid message.

    `reason` may quote the rejected values; `reason_without_values` never does (what a
    gateway that pseudonymises pump ids may show).
    """

    def __init__(
        self, kind: str, reason: str, frame: Frame, reason_without_values: str | None = None
    ) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.frame = frame
        self.reason_without_values = (
            reason if reason_without_values is None else reason_without_values
        )


def describe_fields(errors: list[Any]) -> str:
    """Like describe_errors, without the rejected values: field and rule only."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) if str(p).isidentifier() else "<key>" for p in err.get("loc", ()))
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


def _invalid(errors: list[Any], frame: Frame) -> MessageError:
    return MessageError("invalid_message", describe_errors(errors), frame, describe_fields(errors))


def crc32_hex(body: bytes) -> bytes:
    """The frame checksum: CRC-32/ISO-HDLC as 8 upper-case hex digits."""
    return b"%08X" % zlib.crc32(body)


def encode_frame(msg_type: str, pump_id: str, boot_id: str, seq: int, payload: bytes) -> bytes:
    """Build one frame around an already-encoded JSON payload; ValueError if it cannot be one."""
    if b"$" in payload or b"\n" in payload:
        raise ValueError("payload must not contain '$' or a newline (use encode_payload)")
    if not _PUMP_ID.match(pump_id) or not _BOOT_ID.match(boot_id):
        raise ValueError(f"pump_id {pump_id!r} or boot_id {boot_id!r} is not a valid header id")
    if len(msg_type) != 1 or not msg_type.isascii() or not 0 <= seq <= MAX_HEADER_SEQ:
        raise ValueError(f"message type {msg_type!r} or sequence number {seq} is not valid")
    body = b"PGW%d,%s,%s,%s,%d,%s" % (
        PROTOCOL_VERSION,
        msg_type.encode("ascii"),
        pump_id.encode("ascii"),
        boot_id.encode("ascii"),
        seq,
        payload,
    )
    return b"$" + body + b"*" + crc32_hex(body) + b"\r\n"


def encode_payload(fields: dict[str, Any]) -> bytes:
    """Compact ASCII JSON with `$` escaped, safe inside a frame."""
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
    return text.replace("$", "\\u0024").encode("ascii")


def encode_message(message: DeviceMessageModel) -> bytes:
    """Encode a device message model as a frame (what a pump or bridge sends)."""
    fields = message.model_dump(mode="json", exclude=set(ENVELOPE_FIELDS), exclude_none=True)
    return encode_frame(
        TYPE_BY_KIND[message.kind],
        message.pump_id,
        message.boot_id,
        message.seq,
        encode_payload(fields),
    )


def encode_ack(pump_id: str, boot_id: str, seq: int, from_seq: int | None = None) -> bytes:
    """The gateway's acknowledgement: frames `from_seq`..`seq` of this pump and boot are stored.

    Without `from_seq` it is cumulative (everything up to `seq`).
    """
    payload = b"{}" if from_seq is None else b'{"from":%d}' % from_seq
    return encode_frame(TYPE_ACK, pump_id, boot_id, seq, payload)


def ack_range(frame: Frame) -> tuple[int, int]:
    """The (first, last) sequence numbers an `A` frame acknowledges; first is 0 if cumulative."""
    try:
        fields = json.loads(frame.payload)
    except ValueError:
        return 0, frame.seq
    first = fields.get("from", 0) if isinstance(fields, dict) else 0
    return (first if isinstance(first, int) and 0 <= first <= frame.seq else 0), frame.seq


def parse_frame(raw: bytes) -> Frame | FrameError:
    """Check one complete line (from `$` to `\\n`) and split its header."""
    line = raw.rstrip(b"\r\n")
    star = line.rfind(b"*")
    if star == -1 or len(line) - star - 1 != 8:
        return FrameError("malformed", "no '*' followed by an 8-digit checksum", raw, len(raw))
    body = line[1:star]
    if line[star + 1 :].upper() != crc32_hex(body):
        said = repr(line[star + 1 :].decode("ascii", "replace"))[1:-1]  # no control characters
        return FrameError(
            "checksum",
            f"CRC-32 mismatch: frame says {said}, bytes give {crc32_hex(body).decode()}",
            raw,
            len(raw),
        )
    return _split_header(body, raw)


def _split_header(body: bytes, raw: bytes) -> Frame | FrameError:
    parts = body.split(b",", 5)
    if len(parts) != 6 or not parts[0].startswith(MAGIC):
        reason = "header is not PGW<version>,type,pump,boot,seq,"
        return FrameError("malformed", reason, raw, len(raw))
    version_text = parts[0][len(MAGIC) :]
    if not version_text.isdigit() or len(version_text) > MAX_VERSION_DIGITS:
        return FrameError("malformed", "protocol version is not a small number", raw, len(raw))
    version = int(version_text)
    if version not in SUPPORTED_PROTOCOL_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_PROTOCOL_VERSIONS))
        return FrameError(
            "unsupported_version",
            f"protocol version {version} is not supported (supported: {supported})",
            raw,
            len(raw),
        )
    msg_type = parts[1].decode("ascii", "replace")
    if msg_type not in MODEL_BY_TYPE and msg_type != TYPE_ACK:
        return FrameError("unknown_type", f"unknown message type {msg_type!r}", raw, len(raw))
    if not parts[4].isdigit() or len(parts[4]) > 10:
        return FrameError("malformed", "sequence number is not an unsigned integer", raw, len(raw))
    pump_id = parts[2].decode("ascii", "replace")
    boot_id = parts[3].decode("ascii", "replace")
    # Ids are checked here, not only by the models: an ack must be able to echo them.
    if not _PUMP_ID.match(pump_id):
        reason = f"pump_id {pump_id!r} is not 1-64 of A-Z a-z 0-9 _ . -"
        return FrameError("malformed", reason, raw, len(raw))
    reserved = reserved_pump_id_problem(pump_id)
    if reserved is not None:
        return FrameError("malformed", f"header {reserved}", raw, len(raw))
    if not _BOOT_ID.match(boot_id):
        reason = f"boot_id {boot_id!r} is not 1-16 of A-Z a-z 0-9"
        return FrameError("malformed", reason, raw, len(raw))
    return Frame(version, msg_type, pump_id, boot_id, int(parts[4]), parts[5], raw)


_DOLLARS: Final = re.compile(rb"\$+")
_LONE_DOLLAR_REASON: Final = "truncated frame of 1 bytes: a new '$' arrived before the frame's end"
_FRAME_START: Final = START + MAGIC
"""Every good frame starts so: in a flood only these bytes are looked at closely."""


class _Flood:
    """The bytes of a run after its first RUN_ERRORS_REPORTED errors: how many, and a sample."""

    def __init__(self) -> None:
        self.length = 0
        self.starts = 0
        self.sample = bytearray()

    def add(self, data: bytes) -> None:
        self.length += len(data)
        self.starts += data.count(START)
        room = MAX_GARBAGE_KEPT_BYTES - len(self.sample)
        if room > 0:
            self.sample += data[:room]

    def take(self) -> FrameError | None:
        if not self.length:
            return None
        error = FrameError(
            "flood",
            f"{self.length} bytes of damaged input with {self.starts} frame starts, coalesced "
            f"after {RUN_ERRORS_REPORTED} errors since the last good frame",
            bytes(self.sample),
            self.length,
            max(1, self.starts),
        )
        self.length = self.starts = 0
        self.sample.clear()
        return error


class FrameDecoder:
    """Incremental decoder: feed any chunks of bytes, get frames and errors in order."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes < MAX_RUN_BYTES:
            raise ValueError(f"max_frame_bytes must be in 1..{MAX_RUN_BYTES - 1}")
        self._max = max_frame_bytes
        self._frame = bytearray()
        self._in_frame = False
        self._skipping = False
        self._skipped = 0
        self._garbage = bytearray()
        self._garbage_len = 0
        self._garbage_goes_on = False
        """A garbage run was cut at MAX_RUN_BYTES: its rest is garbage, blank or not."""
        self._reported = 0
        """Errors reported one by one since the last good frame."""
        self._flood = _Flood()

    @property
    def buffered_bytes(self) -> int:
        """Bytes held right now; never more than max_frame_bytes plus the kept samples."""
        return len(self._frame) + len(self._garbage) + len(self._flood.sample)

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        pos, size = 0, len(data)
        while pos < size:
            if self.flooded and not self._in_frame:
                self._skipping = False  # a flood skips to the next "$PGW" on its own
                pos = self._scan_flood(data, pos, out)
            elif self._skipping:
                pos = self._skip_oversized(data, pos, out)
            elif self._in_frame:
                pos = self._read_frame(data, pos, out)
            else:
                pos = self._read_idle(data, pos, out)
        return out

    def flush(self) -> list[FrameError]:
        """Report whatever is held (at end of stream): a partial frame or a garbage run."""
        out: list[Frame | FrameError] = []
        if self._in_frame and self._frame:
            self._report(out, self._truncated("stream ended inside a frame"))
        elif self._skipping:
            self._report(out, self._oversized())
        self._emit_garbage(out)
        self._emit_flood(out)
        self._in_frame = self._skipping = False
        self._reported = 0
        return [e for e in out if isinstance(e, FrameError)]

    def idle(self) -> list[FrameError]:
        """The errors coalesced so far, reported now because the line went quiet."""
        out: list[Frame | FrameError] = []
        self._emit_flood(out)
        return [e for e in out if isinstance(e, FrameError)]

    @property
    def flooded(self) -> bool:
        """RUN_ERRORS_REPORTED errors since the last good frame: the rest is only counted."""
        return self._reported >= RUN_ERRORS_REPORTED

    def _report(self, out: list[Frame | FrameError], error: FrameError) -> None:
        """Report an error, or once the run is a flood, count its bytes (`raw` is all of them:
        in a flood only truncated and unparsable frames are reported here)."""
        if not self.flooded:
            self._reported += 1
            out.append(error)
        else:
            self._flood_bytes(error.raw, out)

    def _flood_bytes(self, data: bytes, out: list[Frame | FrameError]) -> None:
        """Count bytes of a flood, reporting it every MAX_RUN_BYTES exactly."""
        pos = 0
        while pos < len(data):
            take = min(len(data) - pos, MAX_RUN_BYTES - self._flood.length)
            self._flood.add(data[pos : pos + take])
            pos += take
            if self._flood.length >= MAX_RUN_BYTES:
                self._emit_flood(out)

    def _scan_flood(self, data: bytes, pos: int, out: list[Frame | FrameError]) -> int:
        """In a flood: every byte up to the next "$PGW" is flood; a frame starts there."""
        start = data.find(_FRAME_START, pos)
        if start == -1:
            # A `$` among the last bytes may begin "$PGW" in the next chunk: hold it.
            tail = data.rfind(START, max(pos, len(data) - len(_FRAME_START) + 1))
            if tail == -1 or not _FRAME_START.startswith(data[tail:]):
                self._flood_bytes(data[pos:], out)
                return len(data)
            start = tail
        self._flood_bytes(data[pos:start], out)
        self._in_frame = True
        self._frame += START
        return start + 1

    def _emit_flood(self, out: list[Frame | FrameError]) -> None:
        error = self._flood.take()
        if error is not None:
            out.append(error)

    def _read_idle(self, data: bytes, pos: int, out: list[Frame | FrameError]) -> int:
        start = data.find(START, pos)
        end = len(data) if start == -1 else start
        if end > pos:
            self._note_garbage(data[pos:end], out)
        if start == -1:
            return len(data)
        self._emit_garbage(out)
        dollars = _DOLLARS.match(data, start)
        run = dollars.end() - start if dollars else 1
        if run > 1:  # each `$` but the last is a frame of one byte, cut by the next
            self._report_lone_dollars(run - 1, out)
        self._in_frame = True
        self._frame += START
        return start + run

    def _report_lone_dollars(self, count: int, out: list[Frame | FrameError]) -> None:
        """What `count` one-byte truncated frames would report one by one, in bulk."""
        while count and not self.flooded:
            self._report(out, FrameError("truncated", _LONE_DOLLAR_REASON, START, 1))
            count -= 1
        self._flood_bytes(START * count, out)

    def _read_frame(self, data: bytes, pos: int, out: list[Frame | FrameError]) -> int:
        # Look no further than the frame may grow: a search to the chunk's end for every
        # short frame would make many short frames cost quadratic time.
        window_end = min(len(data), pos + self._max - len(self._frame) + 1)
        newline = data.find(END, pos, window_end)
        limit = window_end if newline == -1 else newline
        restart = data.find(START, pos, limit)
        chunk_end = limit if newline == -1 else newline + 1
        stop = chunk_end if restart == -1 else restart
        # Check the size before the restart, or a frame could grow past the cap.
        if len(self._frame) + (stop - pos) > self._max:
            if self.flooded:  # too long to be a frame: flood, and scan on from here
                self._flood_bytes(bytes(self._frame), out)
                self._frame.clear()
                self._in_frame = False
                return pos
            return self._start_skipping(data, pos, out)
        if restart != -1:
            self._frame += data[pos:restart]
            self._report(out, self._truncated("a new '$' arrived before the frame's end"))
            return restart
        self._frame += data[pos:chunk_end]
        if newline != -1:
            result = parse_frame(bytes(self._frame))
            self._frame.clear()
            self._in_frame = False
            if isinstance(result, FrameError):
                self._report(out, result)
            else:  # a good frame ends the run of errors
                self._emit_flood(out)
                self._reported = 0
                self._garbage_goes_on = False
                out.append(result)
        return chunk_end

    def _start_skipping(self, data: bytes, pos: int, out: list[Frame | FrameError]) -> int:
        room = self._max - len(self._frame)
        self._frame += data[pos : pos + room]
        self._skipped = 0
        self._in_frame = False
        self._skipping = True
        return pos + room

    def _skip_oversized(self, data: bytes, pos: int, out: list[Frame | FrameError]) -> int:
        newline = data.find(END, pos)
        limit = len(data) if newline == -1 else newline
        restart = data.find(START, pos, limit)
        stop = restart if restart != -1 else limit
        cap_at = pos + MAX_RUN_BYTES - len(self._frame) - self._skipped
        if cap_at < stop:  # report a huge frame in MAX_RUN_BYTES pieces and skip on
            self._skipped += cap_at - pos
            self._report(out, self._oversized())
            self._skipping = True
            return cap_at
        self._skipped += stop - pos
        if restart != -1:
            self._report(out, self._oversized())
            return restart
        if newline != -1:
            self._skipped += 1
            self._report(out, self._oversized())
            return newline + 1
        return len(data)

    def _oversized(self) -> FrameError:
        length = len(self._frame) + self._skipped
        error = FrameError(
            "oversized",
            f"frame longer than {self._max} bytes (at least {length}); skipped to the next frame",
            bytes(self._frame),
            length,
        )
        self._frame.clear()
        self._skipped = 0
        self._skipping = False
        return error

    def _truncated(self, why: str) -> FrameError:
        raw = bytes(self._frame)
        self._frame.clear()
        self._in_frame = False
        return FrameError("truncated", f"truncated frame of {len(raw)} bytes: {why}", raw, len(raw))

    def _note_garbage(self, chunk: bytes, out: list[Frame | FrameError]) -> None:
        if not self._garbage_len and not self._garbage_goes_on:
            # Blank lines between frames are allowed: a run starts at its first other
            # byte, wherever the chunks were split.
            chunk = chunk.lstrip(BLANK)
            if not chunk:
                return
        while chunk:
            take = min(len(chunk), MAX_RUN_BYTES - self._garbage_len)
            room = MAX_GARBAGE_KEPT_BYTES - len(self._garbage)
            self._garbage += chunk[: min(room, take)]
            self._garbage_len += take
            chunk = chunk[take:]
            if self._garbage_len >= MAX_RUN_BYTES:
                self._emit_garbage(out, goes_on=True)
                if self.flooded:  # that was the last error reported alone
                    self._flood_bytes(chunk, out)
                    return

    def _emit_garbage(self, out: list[Frame | FrameError], *, goes_on: bool = False) -> None:
        if self._garbage_len:
            self._report(
                out,
                FrameError(
                    "garbage",
                    f"{self._garbage_len} bytes outside any frame",
                    bytes(self._garbage),
                    self._garbage_len,
                ),
            )
        self._garbage.clear()
        self._garbage_len = 0
        self._garbage_goes_on = goes_on


def message_from_frame(frame: Frame, received_at: datetime) -> DeviceMessageModel:
    """Validate a frame's payload into its model; raise MessageError with a readable reason."""
    model = MODEL_BY_TYPE.get(frame.msg_type)
    if model is None:
        raise MessageError(
            "unexpected_type", f"message type {frame.msg_type!r} is not sent to the gateway", frame
        )
    document = _with_header(frame, received_at)
    if document is not None:
        try:
            return model.model_validate_json(document)
        except ValidationError as exc:
            errors = exc.errors()
            if not any(e["type"] == "json_invalid" for e in errors):
                raise _invalid(errors, frame) from exc
    return _validate_parsed(model, frame, received_at)  # reports bad JSON in json's words


def _with_header(frame: Frame, received_at: datetime) -> bytes | None:
    """The payload object with the header fields spliced in, or None to take the slow path.

    The fast path parses and validates in one pass (pydantic's JSON mode). It is taken only
    when the payload has no backslash (so every key is spelled literally: `"pump\\u005fid"`
    cannot hide one) and no header field name appears anywhere in it, so a payload can never
    override the header, and when the ids need no JSON escaping; otherwise the slow path
    compares the keys after JSON decoding, with the same result.
    """
    payload = frame.payload
    if (
        not payload.startswith(b"{")
        or b"\\" in payload
        or _ENVELOPE_NAME.search(payload)
        or not _PLAIN_ID.fullmatch(frame.pump_id)
        or not _PLAIN_ID.fullmatch(frame.boot_id)
    ):
        return None
    rest = payload[1:]
    separator = b"" if rest.lstrip(b" \t\r\n").startswith(b"}") else b","
    header = (
        f'{{"pump_id":"{frame.pump_id}","boot_id":"{frame.boot_id}",'
        f'"seq":{frame.seq},"received_at":"{received_at.isoformat()}"'
    )
    return header.encode() + separator + rest


_ENVELOPE_NAME: Final = re.compile(
    b'"(?:%s)"' % b"|".join(name.encode() for name in sorted(ENVELOPE_FIELDS))
)
_PLAIN_ID: Final = re.compile(r"[A-Za-z0-9_.-]+")


def _validate_parsed(
    model: type[DeviceMessageModel], frame: Frame, received_at: datetime
) -> DeviceMessageModel:
    """The slow path: parse with json, check header clashes, then validate the dict."""
    try:
        fields = json.loads(frame.payload)
    except (ValueError, RecursionError) as exc:
        raise MessageError("invalid_json", f"payload is not JSON: {exc}", frame) from exc
    if not isinstance(fields, dict):
        raise MessageError("invalid_json", "payload is not a JSON object", frame)
    clash = ENVELOPE_FIELDS.intersection(fields)
    if clash:
        raise MessageError(
            "invalid_message", f"payload repeats header fields: {sorted(clash)}", frame
        )
    fields["pump_id"] = frame.pump_id
    fields["boot_id"] = frame.boot_id
    fields["seq"] = frame.seq
    fields["received_at"] = received_at
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc.errors(), frame) from exc
    except RecursionError as exc:  # defensive: pydantic repr()s bad values, which recurses
        raise MessageError("invalid_message", "payload is nested too deeply", frame) from exc
