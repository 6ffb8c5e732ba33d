"""The HL7 v2 sink: IHE PCD-01 (readings) and PCD-04 (alert transitions) over MLLP, optional TLS.

The messages are built by gateway/hl7_messages.py (pure); this module groups outbox rows into
messages, frames them (MLLP: <VT> message <FS><CR>), sends one at a time on a kept connection,
and reads the original-mode acknowledgement: AA/CA advances the cursor, AE/CE (and silence,
a dropped connection, a wrong MSA-2) resends the same message, same MSH-10, after a backoff,
AR/CR quarantines it with the receiver's reason (adapters/delivery.py).

Readings of one pump whose device times fall in the same `reading_interval_s` go into one
ORU^R01 (at most `max_readings_per_message`); each alert transition is its own ORU^R40.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.adapters.delivery import (
    ACCEPTED,
    Answer,
    MessageSink,
    Outgoing,
    Pacing,
    PoisonCallback,
    Verdict,
    read_records,
)
from gateway.hl7_messages import (
    NO_LINK,
    DeviceLink,
    Envelope,
    Hl7Message,
    parse_ack,
    pcd01_message,
    pcd04_message,
)
from gateway.outbox import Outbox
from gateway.records import StoredRecord
from schemas.models import AlertTransition, Reading

SINK_NAME: Final = "hl7"
START_BLOCK: Final = b"\x0b"
END_BLOCK: Final = b"\x1c\r"
MAX_ACK_BYTES: Final = 1 << 20
"""An answer longer than this is not an ACK: the connection is dropped and the message resent."""
READ_CHUNK_BYTES: Final = 65536
MLLP_DEFAULT_PORT: Final = 2575
EUI64: Final = re.compile(r"[0-9A-F]{16}")


def _readable_map(value: Path | None) -> Path | None:
    if value is not None:
        load_device_map(value, "")
    return value


DeviceMapFile = Annotated[Path | None, AfterValidator(_readable_map)]
"""A device map setting, read once when the configuration loads (ValueError names the file)."""


class Hl7Settings(BaseModel):
    """The [hl7] section: where PCD-01/PCD-04 messages go and how they are addressed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="mllp://host:port, or mllps://host:port for MLLP over TLS")
    sending_application: str = Field("PUMPGW", min_length=1, description="MSH-3")
    sending_facility: str = Field("", description="MSH-4, e.g. the site and station")
    receiving_application: str = Field("", description="MSH-5")
    receiving_facility: str = Field("", description="MSH-6")
    processing_id: Literal["P", "T", "D"] = Field("P", description="MSH-11: production/test")
    reading_interval_s: float = Field(
        60.0, ge=0, description="readings of one pump in one interval share an ORU^R01; 0: one each"
    )
    max_readings_per_message: int = Field(100, ge=1, le=1000, description="OBR groups per ORU^R01")
    send_readings: bool = Field(True, description="PCD-01 observation reports")
    send_alerts: bool = Field(True, description="PCD-04 alert reports")
    device_map_file: DeviceMapFile = Field(
        None, description="JSON {pump_id: {patient_id, eui64}}: PID and OBX-18 (see docs)"
    )
    patient_assigning_authority: str = Field("", description="PID-3.4 with device_map_file")
    batch_rows: int = Field(2000, ge=1, le=100_000, description="outbox rows read at once")
    send_every_s: float = Field(1.0, ge=0, le=3600, description="pause after a busy drain")
    connect_timeout_s: float = Field(5.0, gt=0, le=600, description="TCP and TLS connect")
    ack_timeout_s: float = Field(10.0, gt=0, le=600, description="wait for the ACK")
    ca_file: Path | None = Field(None, description="mllps: CA bundle of a private CA")
    cert_file: Path | None = Field(None, description="mllps: client certificate (PEM)")
    key_file: Path | None = Field(None, description="mllps: client key (PEM, mode 600)")
    verify_tls: bool = Field(True, description="mllps: verify the receiver's certificate")
    retry_initial_s: float = Field(0.5, gt=0, description="first backoff after a failure")
    retry_max_s: float = Field(30.0, gt=0, description="backoff cap; also the refused pace")

    @field_validator("url")
    @classmethod
    def _mllp_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mllp", "mllps") or not parts.hostname:
            raise ValueError("use mllp://host:port or mllps://host:port")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from exc
        return value

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _existing(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Hl7Settings:
        tls_files = (self.ca_file, self.cert_file, self.key_file)
        if not self.url.startswith("mllps:") and any(f is not None for f in tls_files):
            raise ValueError("ca_file, cert_file and key_file need url = 'mllps://host:port'")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be at least retry_initial_s")
        return self

    def display_url(self) -> str:
        receiver = f"{self.receiving_application or '-'}/{self.receiving_facility or '-'}"
        return f"{self.url} (MSH-5/6 {receiver}, readings per {self.reading_interval_s:g} s)"

    def envelope(self) -> Envelope:
        return Envelope(
            self.sending_application,
            self.sending_facility,
            self.receiving_application,
            self.receiving_facility,
            self.processing_id,
        )

    def pacing(self) -> Pacing:
        return Pacing(self.batch_rows, self.send_every_s, self.retry_initial_s, self.retry_max_s)


def load_device_map(path: Path, assigning_authority: str) -> dict[str, DeviceLink]:
    """Read a device map: {pump_id: {"patient_id": str, "eui64": 16 hex digits}}; ValueError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the device map {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of pump ids")
    links = {}
    for pump_id, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - {"patient_id", "eui64"}:
            raise ValueError(f"{path}: {pump_id}: use {{'patient_id': ..., 'eui64': ...}}")
        eui64 = entry.get("eui64")
        if eui64 is not None and not (isinstance(eui64, str) and EUI64.fullmatch(eui64)):
            raise ValueError(f"{path}: {pump_id}: eui64 must be 16 upper-case hex digits")
        patient = entry.get("patient_id")
        links[str(pump_id)] = DeviceLink(
            None if patient is None else str(patient), assigning_authority, eui64
        )
    return links


def device_links(path: Path | None, assigning_authority: str) -> dict[str, DeviceLink]:
    """The device map at `path`, or none when no file is set."""
    return {} if path is None else load_device_map(path, assigning_authority)


class Hl7Encoder:
    """Outbox rows -> PCD-01 (readings grouped per pump and interval) and PCD-04 messages."""

    splittable = False  # an AR names a message: the whole message is quarantined

    def __init__(self, settings: Hl7Settings, links: Mapping[str, DeviceLink]) -> None:
        self._settings = settings
        self._envelope = settings.envelope()
        self._links = links

    def encode(self, rows: Sequence[StoredRecord]) -> list[Outgoing]:
        settings = self._settings
        chosen, out = read_records(
            rows, readings=settings.send_readings, alerts=settings.send_alerts
        )
        groups: dict[tuple[str, int], list[tuple[StoredRecord, Reading]]] = {}
        for row, record in chosen:
            if isinstance(record, Reading):
                self._group(row, record, groups, out)
            else:
                out.append(self._alert(row, record))
        out.extend(self._readings(group) for group in groups.values())
        return out

    def _group(
        self,
        row: StoredRecord,
        reading: Reading,
        groups: dict[tuple[str, int], list[tuple[StoredRecord, Reading]]],
        out: list[Outgoing],
    ) -> None:
        """Add a reading to its (pump, interval) group; a full group becomes a message."""
        interval_s = self._settings.reading_interval_s
        bucket = int(reading.device_time.timestamp() // interval_s) if interval_s else row.seq
        group = groups.setdefault((reading.pump_id, bucket), [])
        group.append((row, reading))
        if len(group) >= self._settings.max_readings_per_message:
            out.append(self._readings(groups.pop((reading.pump_id, bucket))))

    def _alert(self, row: StoredRecord, alert: AlertTransition) -> Outgoing:
        link = self._links.get(alert.pump_id, NO_LINK)
        return _outgoing((row,), pcd04_message(alert, self._envelope, link))

    def _readings(self, group: list[tuple[StoredRecord, Reading]]) -> Outgoing:
        readings = [reading for _, reading in group]
        link = self._links.get(readings[0].pump_id, NO_LINK)
        message = pcd01_message(readings, self._envelope, link)
        return _outgoing(tuple(row for row, _ in group), message)


def _outgoing(rows: tuple[StoredRecord, ...], message: Hl7Message) -> Outgoing:
    return Outgoing(rows, message.text.encode(), message.control_id)


def _control_id(body: bytes) -> str:
    """MSH-10 of an encoded message (the tenth field of its first segment)."""
    return body.split(b"\r", 1)[0].split(b"|")[9].decode()


def answer_for(ack_text: str, control_id: str) -> Answer:
    """The verdict an acknowledgement carries for the message with this MSH-10."""
    try:
        ack = parse_ack(ack_text)
    except ValueError as exc:
        return Answer(Verdict.RETRY, f"unreadable acknowledgement: {exc}")
    if ack.control_id != control_id:
        return Answer(Verdict.RETRY, f"ACK for {ack.control_id!r}, expected {control_id!r}")
    reason = f"{ack.code}: {ack.reason}" if ack.reason else ack.code
    if ack.code in ("AA", "CA"):
        return ACCEPTED
    if ack.code in ("AR", "CR"):
        return Answer(Verdict.REJECTED, reason)
    return Answer(Verdict.RETRY, reason)  # AE, CE and anything unknown


class MllpTransport:
    """One kept TCP (or TLS) connection; a message, then its ACK, then the next."""

    def __init__(self, settings: Hl7Settings) -> None:
        parts = urlsplit(settings.url)
        self._host = parts.hostname or ""
        self._port = parts.port or MLLP_DEFAULT_PORT
        self._settings = settings
        self._tls = self._tls_context(settings) if parts.scheme == "mllps" else None
        self._sock: socket.socket | None = None
        self._pending = b""

    @staticmethod
    def _tls_context(settings: Hl7Settings) -> ssl.SSLContext:
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        if not settings.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if settings.cert_file is not None:
            context.load_cert_chain(
                str(settings.cert_file), str(settings.key_file) if settings.key_file else None
            )
        return context

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(
                (self._host, self._port), timeout=self._settings.connect_timeout_s
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(self._settings.ack_timeout_s)
            self._sock, self._pending = sock, b""
        return self._sock

    def send(self, message: Outgoing) -> Answer:
        where = f"{self._host}:{self._port}"
        try:
            sock = self._connect()
            sock.sendall(START_BLOCK + message.body + END_BLOCK)
            reply = self._read_block(sock)
        except (OSError, ValueError) as exc:  # refused, reset, timeout, TLS, oversized
            self.close()
            reason = f"MLLP {where}: {exc or type(exc).__name__}"
            return Answer(Verdict.RETRY, reason, connected=False)
        answer = answer_for(reply.decode("utf-8", "replace"), _control_id(message.body))
        if answer.verdict is Verdict.RETRY and answer.reason.startswith("ACK for"):
            self.close()  # out of step with the receiver: start a fresh connection
        return answer

    def _read_block(self, sock: socket.socket) -> bytes:
        """The next MLLP block's content; bytes before its start block are ignored."""
        buffer = self._pending
        while END_BLOCK not in buffer:
            if len(buffer) > MAX_ACK_BYTES:
                raise ValueError(f"answer longer than {MAX_ACK_BYTES} bytes without an end block")
            chunk = sock.recv(READ_CHUNK_BYTES)
            if not chunk:
                raise ConnectionError("the receiver closed the connection before acknowledging")
            buffer += chunk
        block, _, self._pending = buffer.partition(END_BLOCK)
        return block[block.find(START_BLOCK) + 1 :]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def make_hl7_sink(
    settings: Hl7Settings, outbox: Outbox, *, on_poison: PoisonCallback
) -> MessageSink:
    """The [hl7] sink, device map read now (ValueError names the file)."""
    links = device_links(settings.device_map_file, settings.patient_assigning_authority)
    encoder, transport = Hl7Encoder(settings, links), MllpTransport(settings)
    return MessageSink(
        SINK_NAME, outbox, encoder, transport, settings.pacing(), on_poison=on_poison
    )


__all__ = [
    "SINK_NAME",
    "DeviceMapFile",
    "Hl7Encoder",
    "Hl7Settings",
    "MllpTransport",
    "answer_for",
    "device_links",
    "load_device_map",
    "make_hl7_sink",
]
