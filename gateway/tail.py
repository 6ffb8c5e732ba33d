"""`pumpgw tail`: subscribe to a station's topic tree and print one line per message.

`render_message` is pure: topic and payload in, one printable line out. It parses the
payload with the schemas models and renders each kind compactly; a payload that is not
JSON, has an unknown kind or fails validation is shown raw and truncated. Control
characters are escaped, so a payload can neither break the one-line format nor send
escape sequences to the terminal. `run_tail` is the paho-mqtt shell around it: paho's
thread only queues what arrives, the caller's thread renders and writes, with rich
colours on a terminal and plain text otherwise.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties
from pydantic import BaseModel, SecretStr, ValidationError

from gateway.adapters.mqtt_client import (
    ClientEvent,
    Connected,
    Disconnected,
    MqttClient,
    MqttSettings,
    MqttTls,
    Refused,
    Subscribed,
    Unreachable,
)
from schemas.models import (
    MODELS_BY_KIND,
    Acknowledgement,
    AckRefusal,
    ActiveAlerts,
    AlertTransition,
    DeviceEvent,
    DeviceInfo,
    GatewayStatus,
    PumpStatus,
    Quarantined,
    Reading,
    describe_errors,
)

MAX_RAW_CHARS: Final = 160
MAX_ERROR_CHARS: Final = 160
MAX_BASE_LEVELS: Final = 3
"""`{prefix}/{site}/{station}`: the most of a filter's literal start that is left out."""
POLL_S: Final = 0.2
KEEPALIVE_S: Final = 30
RECONNECT_MIN_S: Final = 1
RECONNECT_MAX_S: Final = 30
DEFAULT_PORTS: Final = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}
TLS_SCHEMES: Final = frozenset({"mqtts", "ssl"})
PROTOCOLS: Final = {
    "5": MQTTProtocolVersion.MQTTv5,
    "3.1.1": MQTTProtocolVersion.MQTTv311,
    "311": MQTTProtocolVersion.MQTTv311,
}
MAX_QUEUED_MESSAGES: Final = 1000
"""Messages waiting to be printed; past this tail counts them instead (a flood cannot grow it)."""
MAX_PAYLOAD_BYTES: Final = 65_536
"""Bytes kept of one payload: a larger one is no pumpgw message and is shown raw anyway."""
FATAL_CONNACK: Final = frozenset({"Bad user name or password", "Not authorized", "Banned"})
"""Refusals that retrying cannot fix: tail stops with exit code 1."""

PRIORITY_STYLE: Final = {"PH": "bold white on red", "PM": "bold black on yellow", "PL": "cyan"}
WARN, BAD, GOOD, DIM, MARK = "yellow", "bold red", "green", "dim", "magenta"

Segment = tuple[str, str]
"""A piece of a line and its rich style ("" for none)."""


# --- pure rendering ---------------------------------------------------------------------


def render_message(
    topic: str, payload: bytes, *, historical: bool, base: str, retained: bool = False
) -> str:
    """One plain line for one message: short topic, markers and a summary of the payload."""
    segments = render_segments(topic, payload, historical=historical, base=base, retained=retained)
    return "".join(text for text, _ in segments)


def render_segments(
    topic: str, payload: bytes, *, historical: bool, base: str, retained: bool = False
) -> list[Segment]:
    """The same line as styled segments, for a terminal."""
    segments: list[Segment] = [(short_topic(topic, base), DIM), ("  ", "")]
    if historical:
        segments.append(("[historical] ", MARK))
    if retained:
        segments.append(("[retained] ", DIM))
    segments.extend(_summary(topic, payload))
    return [(_printable(text), style) for text, style in segments]


def short_topic(topic: str, base: str) -> str:
    """The topic without `base/` in front (the whole topic if it lies outside `base`)."""
    base = base.rstrip("/")
    if base and topic.startswith(base + "/"):
        return topic[len(base) + 1 :]
    return topic


def filter_base(topic_filter: str) -> str:
    """The literal start of a filter, up to `{prefix}/{site}/{station}`, to shorten topics by."""
    literal = []
    for level in topic_filter.split("/")[:MAX_BASE_LEVELS]:
        if level in ("+", "#"):
            break
        literal.append(level)
    if len(literal) == len(topic_filter.split("/")):
        literal = literal[:-1]  # a filter for one exact topic: keep its last level visible
    return "/".join(literal)


def _summary(topic: str, payload: bytes) -> list[Segment]:
    try:
        return _parsed_summary(topic, payload)
    except Exception as exc:  # noqa: BLE001 - nothing a publisher sends may stop the view
        problem = _clip(f"{type(exc).__name__}: {exc}", MAX_ERROR_CHARS)
        return [(f"unreadable: {problem}", WARN), *_raw(" raw", payload)]


def _parsed_summary(topic: str, payload: bytes) -> list[Segment]:
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return _raw("not JSON", payload)
    if not isinstance(data, dict):
        return _raw("not a JSON object", payload)
    kind = data.get("kind")
    if kind is None and ("/ack/" in topic or topic.endswith("/ack")):
        kind = "acknowledgement"
    model = MODELS_BY_KIND.get(kind) if isinstance(kind, str) else None
    if model is None:
        return _raw(f"unknown kind {str(kind)[:40]!r}", payload)
    try:
        message = model.model_validate(data)
    except ValidationError as exc:
        problem = _clip(describe_errors(exc.errors()), MAX_ERROR_CHARS)
        return [(f"invalid {kind}: {problem}", WARN), *_raw(" raw", payload)]
    return RENDERERS[type(message)](message)


def _raw(why: str, payload: bytes) -> list[Segment]:
    text = payload.decode("utf-8", errors="replace")
    return [(f"{why} ({len(payload)} B): ", WARN), (_clip(text, MAX_RAW_CHARS), "")]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _priority(priority: str) -> Segment:
    return (priority, PRIORITY_STYLE.get(priority, ""))


def _reading(r: Reading) -> list[Segment]:
    low = r.reservoir_ml <= r.low_reservoir_alarm_ml
    battery = f"battery {r.battery_state}"
    if r.battery_remaining_pct is not None:
        battery += f" {r.battery_remaining_pct:.0f}%"
    segments: list[Segment] = [
        (f"{r.pump_id} reading #{r.seq} ", ""),
        (f"reservoir {r.reservoir_ml:.2f} mL (est.)", WARN if low else ""),
        (f" rate {r.basal_rate_ml_per_day:.3f} mL/d delivered {r.delivered_total_ml:.2f} mL ", ""),
        (str(r.pump_state), "" if r.pump_state == "running" else BAD),
        (" ", ""),
        (battery, "" if r.battery_state == "ok" else WARN),
    ]
    for index, alarm in enumerate(r.alarms):
        segments += [(" alarms: " if index == 0 else ", ", ""), (alarm.code, "")]
        segments += [("(", ""), _priority(alarm.priority), (")", "")]
    return segments


def _alert(a: AlertTransition) -> list[Segment]:
    by = f" (acknowledged by {a.acknowledged_by})" if a.acknowledged_by else ""
    return [
        (f"{a.pump_id} ALERT ", BAD if a.phase == "start" else ""),
        _priority(a.priority),
        (f" {a.phase} {a.alert_kind}: {a.text}{by}", ""),
    ]


def _pump_status(s: PumpStatus) -> list[Segment]:
    segments: list[Segment] = [
        (f"{s.pump_id} status telemetry ", ""),
        (s.telemetry, "" if s.telemetry == "ok" else BAD),
    ]
    if s.reservoir_ml is not None:
        segments.append((f" reservoir {s.reservoir_ml:.2f} mL (est.)", ""))
    if s.pump_state is not None:
        segments.append((f" {s.pump_state}", "" if s.pump_state == "running" else BAD))
    if s.battery_state is not None:
        segments.append((f" battery {s.battery_state}", "" if s.battery_state == "ok" else WARN))
    return segments


def _active_alerts(a: ActiveAlerts) -> list[Segment]:
    segments: list[Segment] = [(f"{a.pump_id} active alerts {len(a.alerts)}", "")]
    for index, alert in enumerate(a.alerts):
        segments += [(": " if index == 0 else ", ", ""), (alert.alert_kind, ""), ("(", "")]
        segments += [_priority(alert.priority), (")", "")]
    return segments


def _gateway_status(g: GatewayStatus) -> list[Segment]:
    connected = sum(source.connected for source in g.sources)
    return [
        (f"gateway {g.site}/{g.station} ", ""),
        (g.state, GOOD if g.state == "online" else BAD),
        (f" session {g.session_id} seq {g.seq} version {g.version}", ""),
        (f" sources {connected}/{len(g.sources)} connected", ""),
    ]


def _quarantine(q: Quarantined) -> list[Segment]:
    pump = f" pump {q.pump_id}" if q.pump_id else ""
    reason = _clip(q.reason, MAX_ERROR_CHARS)
    return [("QUARANTINE ", BAD), (f"{q.reason_kind}: {reason}{pump} from {q.source}", "")]


def _info(i: DeviceInfo) -> list[Segment]:
    return [
        (
            f"{i.pump_id} info {i.model} serial {i.serial} firmware {i.firmware} {i.drug} "
            f"{i.concentration_mg_per_ml:g} mg/mL capacity {i.reservoir_capacity_ml:.1f} mL "
            f"rate {i.prescription.basal_rate_ml_per_day:.3f} mL/d",
            "",
        )
    ]


def _event(e: DeviceEvent) -> list[Segment]:
    details = ""
    if e.bolus_ml is not None:
        details += f" bolus {e.bolus_ml:.3f} mL"
    if e.withdrawn_ml is not None:
        details += f" withdrawn {e.withdrawn_ml:.2f} mL"
    if e.filled_ml is not None:
        details += f" filled {e.filled_ml:.2f} mL"
    return [(f"{e.pump_id} event #{e.seq} {e.event}{details}", "")]


def _acknowledgement(a: Acknowledgement) -> list[Segment]:
    note = f": {a.note}" if a.note else ""
    by = f" by {a.by}" if a.by else ""
    return [(f"ACK {a.alert_id}{by}{note}", "")]


def _ack_refusal(r: AckRefusal) -> list[Segment]:
    who = r.username or "an unusable user name"
    return [(f"ACK REFUSED {r.alert_id or '-'} from {who}: {r.reason_kind}", WARN),
            (f" {_printable(r.reason)}", "")]  # fmt: skip


RENDERERS: Final[dict[type[BaseModel], Callable[[Any], list[Segment]]]] = {
    Reading: _reading,
    AlertTransition: _alert,
    PumpStatus: _pump_status,
    ActiveAlerts: _active_alerts,
    GatewayStatus: _gateway_status,
    Quarantined: _quarantine,
    DeviceInfo: _info,
    DeviceEvent: _event,
    Acknowledgement: _acknowledgement,
    AckRefusal: _ack_refusal,
}


# --- the MQTT shell ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


@dataclass(frozen=True, slots=True)
class _Received:
    topic: str
    payload: bytes
    historical: bool
    retained: bool
    at: datetime


@dataclass(frozen=True, slots=True)
class _Status:
    text: str
    fatal: bool = False


@dataclass(slots=True)
class _Dropped:
    """Messages not queued because tail was behind; `shown`: how many it has reported."""

    count: int = 0
    shown: int = 0


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:port]` or `mqtts://host[:port]`; raise ValueError naming the problem."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r}: use mqtt://host:port or mqtts://host:port")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"{url!r}: the port is not a number from 0 to 65535") from exc
    return BrokerAddress(parts.hostname, port, parts.scheme in TLS_SCHEMES)


def is_historical(properties: Properties | None) -> bool:
    """Whether an MQTT 5 user property `historical=true` marks a replayed message."""
    pairs = getattr(properties, "UserProperty", None) or []
    return any(key == "historical" and str(value).lower() == "true" for key, value in pairs)


def connection_options(mqtt_settings: MqttSettings) -> dict[str, Any]:
    """run_tail's credentials, TLS and protocol from the gateway's [mqtt] section."""
    tls = mqtt_settings.tls
    return {
        "username": mqtt_settings.username,
        "password": mqtt_settings.password_value(),
        "ca_file": str(tls.ca_file) if tls.ca_file else None,
        "cert_file": str(tls.cert_file) if tls.cert_file else None,
        "key_file": str(tls.key_file) if tls.key_file else None,
        "tls_insecure": tls.insecure_skip_verify,
        "protocol": mqtt_settings.protocol,
    }


def run_tail(
    url: str,
    topic_filter: str,
    *,
    stop: threading.Event,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    tls_insecure: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    protocol: str = "5",
) -> int:
    """Print every message under `topic_filter` until `stop` is set; return the exit code."""
    try:
        address = parse_broker_url(url)
    except ValueError as exc:
        print(f"pumpgw tail: {exc}", file=err)
        return 2
    version = PROTOCOLS.get(protocol)
    if version is None:
        print(f"pumpgw tail: protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}", file=err)
        return 2
    tls = address.tls or ca_file is not None
    try:
        settings = MqttSettings(
            url=f"{'mqtts' if tls else 'mqtt'}://{address.host}:{address.port}",
            protocol="5" if version == MQTTProtocolVersion.MQTTv5 else "3.1.1",
            username=username,
            password=None if password is None else SecretStr(password),
            tls=MqttTls(
                ca_file=None if ca_file is None else Path(ca_file),
                cert_file=None if cert_file is None else Path(cert_file),
                key_file=None if key_file is None else Path(key_file),
                insecure_skip_verify=tls_insecure,
            ),
            keepalive_s=KEEPALIVE_S,
            reconnect_max_s=RECONNECT_MAX_S,
            session_expiry_s=0,
        )
    except ValidationError as exc:
        print(f"pumpgw tail: {describe_errors(exc.errors())}", file=err)
        return 2
    events: queue.Queue[_Received | _Status] = queue.Queue()
    dropped = _Dropped()
    client = _client(settings, events, dropped, topic_filter, url)
    client.start()
    try:
        return _print_events(events, dropped, _Printer(out), filter_base(topic_filter), stop)
    finally:
        client.stop()


def _print_events(
    events: queue.Queue[_Received | _Status],
    dropped: _Dropped,
    printer: _Printer,
    base: str,
    stop: threading.Event,
) -> int:
    while not stop.is_set():
        if dropped.count > dropped.shown:
            missed, dropped.shown = dropped.count - dropped.shown, dropped.count
            printer.line(datetime.now().astimezone(), [(f"-- {missed} messages not shown: "
                         "they arrived faster than they could be printed", WARN)])  # fmt: skip
        try:
            event = events.get(timeout=POLL_S)
        except queue.Empty:
            continue
        stamp = datetime.now().astimezone() if isinstance(event, _Status) else event.at
        if isinstance(event, _Status):
            printer.line(stamp, [(f"-- {event.text}", BAD if event.fatal else DIM)])
            if event.fatal:
                return 1
            continue
        segments = render_segments(
            event.topic,
            event.payload,
            historical=event.historical,
            base=base,
            retained=event.retained,
        )
        printer.line(stamp, segments)
    return 0


def _client(
    settings: MqttSettings,
    events: queue.Queue[_Received | _Status],
    dropped: _Dropped,
    topic_filter: str,
    url: str,
) -> MqttClient:
    """An MQTT client whose events only queue lines to print (they come on paho's thread)."""

    def on_event(event: ClientEvent) -> None:
        match event:
            case Refused(_code, name):
                events.put(_Status(f"{url} refused the connection: {name}", name in FATAL_CONNACK))
            case Connected():
                events.put(_Status(f"connected to {url}"))
            case Subscribed(refused):
                said = "the broker refused the subscription to" if refused else "subscribed to"
                events.put(_Status(f"{said} {topic_filter}", bool(refused)))
            case Disconnected(_code, name):
                events.put(_Status(f"disconnected from {url} ({name}); reconnecting"))
            case Unreachable():
                events.put(_Status(f"cannot reach {url}; retrying"))
            case _:
                pass

    def on_message(msg: mqtt.MQTTMessage) -> None:
        historical = is_historical(getattr(msg, "properties", None))
        at = datetime.now().astimezone()
        if events.qsize() >= MAX_QUEUED_MESSAGES:
            dropped.count += 1
            return
        payload = bytes(msg.payload[:MAX_PAYLOAD_BYTES])
        events.put(_Received(msg.topic, payload, historical, bool(msg.retain), at))

    def subscribe(paho: mqtt.Client, _connected: Connected) -> None:
        paho.subscribe(topic_filter, qos=1)

    return MqttClient(
        settings,
        f"pumpgw-tail-{uuid.uuid4().hex[:8]}",
        emit=on_event,
        on_message=on_message,
        on_connect=subscribe,
        subscribed_filters=(topic_filter,),
        fresh_session=True,
    )


class _Printer:
    """Writes lines: rich colours when `out` is a terminal, plain text otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._console: Any = None
        if out.isatty():
            from rich.console import Console

            self._console = Console(file=out, highlight=False, soft_wrap=True)

    def line(self, at: datetime, segments: list[Segment]) -> None:
        stamp = at.strftime("%H:%M:%S.%f")[:-3]
        if self._console is not None:
            from rich.text import Text

            self._console.print(Text.assemble((stamp + " ", DIM), *segments))
            return
        self._out.write(stamp + " " + "".join(text for text, _ in segments) + "\n")
        self._out.flush()
