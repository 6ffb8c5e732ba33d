"""The AsyncAPI 3.0 document of the gateway's MQTT topic tree, built from the code.

    python -m schemas.export     # writes it to schemas/json/asyncapi.json with the JSON Schemas

The document describes the gateway as the application: it *sends* on every topic of its
station's tree and *receives* operators' acknowledgements. Everything in it is derived, so it
cannot drift from the gateway:

- channel addresses from `gateway.topics` (the same functions that name the topics at run time);
- retain per channel from `gateway.topics.is_retained`, QoS and the session settings from
  `gateway.adapters.mqtt` (MQTT binding 0.2.0);
- payload schemas from the JSON Schemas of `schemas.export` (`schema_for`), with each model's
  `$defs` moved to `components/schemas` so the document is self-contained;
- examples from real model instances, so they validate by construction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from pydantic import BaseModel

from gateway.adapters.mqtt import MAX_ACK_BYTES, QOS
from gateway.adapters.mqtt_client import MqttSettings
from gateway.ingest import subscriptions
from gateway.records import GATEWAY_PUMP_ID
from gateway.topics import (
    DEFAULT_PREFIX,
    TopicBase,
    ack_refusal_topic,
    deadletter_topic,
    is_retained,
    status_topic,
    subscription_filter,
    topic_for,
)
from schemas.models import (
    INTENDED_USE,
    MODELS_BY_KIND,
    SCHEMA_VERSION,
    Acknowledgement,
    AckRefusal,
    ActiveAlerts,
    AlertTransition,
    DeviceAlarm,
    DeviceEvent,
    DeviceInfo,
    EventKind,
    GatewayStatus,
    Inactivation,
    Phase,
    Prescription,
    PumpStatus,
    Quarantined,
    Reading,
    SourceStatus,
)

ASYNCAPI_VERSION: Final = "3.0.0"
MQTT_BINDING_VERSION: Final = "0.2.0"
DOCUMENT_NAME: Final = "asyncapi.json"
DOCUMENT_ID: Final = f"urn:pumpgw:asyncapi:v{SCHEMA_VERSION}"
CONTENT_TYPE: Final = "application/json"
DEFS_REF: Final = "#/$defs/"
COMPONENT_SCHEMA_REF: Final = "#/components/schemas/"

PLACEHOLDERS: Final = TopicBase(site="{site}", station="{station}", prefix="{prefix}")
"""A topic base whose levels are the address parameters: the topic functions fill them in."""
ROOT: Final = PLACEHOLDERS.root
ACK_ADDRESS: Final = f"{ROOT}/ack/{{username}}"
"""Per-user acknowledgements: only the MQTT user `username` may write here (Mosquitto `%u`)."""
LEGACY_ACK_ADDRESS: Final = f"{ROOT}/ack"

PARAMETERS: Final[dict[str, dict[str, Any]]] = {
    "prefix": {
        "description": "`mqtt.topic_prefix`: the first topic level.",
        "default": DEFAULT_PREFIX,
        "examples": [DEFAULT_PREFIX],
    },
    "site": {"description": "`gateway.site`: the hospital or site.", "examples": ["north"]},
    "station": {
        "description": "`gateway.station`: the ward or station one gateway serves.",
        "examples": ["ward-3"],
    },
    "pump_id": {
        "description": "The pump's id, or its keyed hash when `gateway.pseudonymize_key` is set "
        "(then no patient-identifying id leaves the station).",
        "examples": ["P0001"],
    },
    "username": {
        "description": "The MQTT user name the operator's client logged in with. The broker lets "
        "only that user write here (Mosquitto ACL `pattern write pumpgw/+/+/ack/%u`).",
        "examples": ["nurse.jones"],
    },
}

TAGS: Final[dict[str, str]] = {
    "pump": "One pump's telemetry, state and alerts.",
    "gateway": "The gateway itself: its birth and last will, its own technical alerts.",
    "retained": "Published with the retain flag: holds the current state for late subscribers.",
    "operator": "Published by operators' clients (dashboards); the gateway subscribes.",
    "ingest": "Also taken by the central ingest workers through a shared subscription.",
    "deprecated": "Kept only to describe what is refused; do not use.",
}

HEADERS_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "MQTT 5 user properties (MQTT 3.1.1 has none).",
    "properties": {
        "record_id": {
            "type": "string",
            "description": "The record's stable identity: consumers deduplicate on it. Repeats "
            "after a reconnect are byte-identical and carry the same record_id.",
        },
        "historical": {
            "type": "string",
            "const": "true",
            "description": "Present on a record older than `mqtt.historical_after_s` when "
            "published (a backlog replay): fill in history, do not sound or flash for it.",
        },
    },
}


def _session(model: type[BaseModel], seq: int) -> dict[str, Any]:
    """`session_id` and `seq` for a model that declares them (retained state carries them)."""
    fields = model.model_fields
    return {
        name: value
        for name, value in (("session_id", "5b1c0e9f2a7d4c3e"), ("seq", seq))
        if name in fields
    }


EXAMPLE_AT: Final = datetime(2025, 3, 1, 8, 0, 5, tzinfo=UTC)
_DEVICE: Final[dict[str, Any]] = {
    "pump_id": "P0001", "boot_id": "3fa2c1d0", "device_time": EXAMPLE_AT,
    "received_at": EXAMPLE_AT,
}  # fmt: skip
_ALERT: Final = AlertTransition(
    alert_id="P0001:low_reservoir:1", transition_id="P0001:low_reservoir:1:start",
    pump_id="P0001", alert_kind="low_reservoir", priority="PM", alert_type="ST",
    state="active", phase="start", latching=True, value=1.8, threshold=2.0, unit="mL",
    text="Reservoir estimate 1.8 mL is at or below the 2.0 mL alarm volume", at=EXAMPLE_AT,
    device_time=EXAMPLE_AT, cause_record_id="P0001:3fa2c1d0:7",
)  # fmt: skip
_ACKED: Final = _ALERT.model_copy(update={
    "transition_id": "P0001:low_reservoir:1:acknowledged", "phase": Phase.ACKNOWLEDGED,
    "inactivation": Inactivation.ACKNOWLEDGED, "acknowledged_by": "nurse.jones",
    "acknowledged_at": EXAMPLE_AT,
})  # fmt: skip


def _gateway_status(state: str, seq: int) -> GatewayStatus:
    return GatewayStatus.model_validate({
        "site": "north", "station": "ward-3", "state": state, "at": EXAMPLE_AT,
        "version": "0.1.0", **_session(GatewayStatus, seq),
        "sources": [SourceStatus(url="socket://127.0.0.1:7000", connected=state == "online")],
    })  # fmt: skip


def examples() -> dict[str, list[tuple[str, BaseModel]]]:
    """Named example payloads per message kind: real model instances, so they validate."""
    return {
        "reading": [("running", Reading(
            **_DEVICE, seq=7, drug="morphine", pump_state="running", reservoir_ml=1.8,
            reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=2.0, basal_rate_ml_per_day=0.5,
            delivered_total_ml=18.2, battery_remaining_pct=50.0,
            alarms=(DeviceAlarm(code="low_reservoir", priority="PM"),)))],
        "info": [("programming", DeviceInfo(
            **_DEVICE, seq=1, model="Prometra II", serial="13827-001", firmware="2.01.1",
            reservoir_capacity_ml=20.0, drug="baclofen", concentration_mg_per_ml=2.0,
            prescription=Prescription(basal_rate_ml_per_day=0.3, bolus_lockout_min=60,
                                      boluses_per_day_max=4, low_reservoir_alarm_ml=3.0)))],
        "event": [
            ("refill", DeviceEvent(**_DEVICE, seq=2, event=EventKind.REFILL, withdrawn_ml=2.7,
                                   filled_ml=20.0)),
            ("motor stall", DeviceEvent(**_DEVICE, seq=4, event=EventKind.MOTOR_STALL_START)),
        ],
        "alert": [("start", _ALERT), ("acknowledged", _ACKED)],
        "active_alerts": [("one active alert", ActiveAlerts.model_validate({
            "pump_id": "P0001", "at": EXAMPLE_AT, "alerts": [_ALERT],
            **_session(ActiveAlerts, 12)}))],
        "pump_status": [
            ("telemetry ok", PumpStatus.model_validate({
                "pump_id": "P0001", "telemetry": "ok", "at": EXAMPLE_AT,
                "last_record_id": "P0001:3fa2c1d0:7", "last_device_time": EXAMPLE_AT,
                "reservoir_ml": 1.8, "pump_state": "running", "battery_state": "ok",
                **_session(PumpStatus, 41)})),
            ("telemetry lost", PumpStatus.model_validate({
                "pump_id": "P0001", "telemetry": "lost", "at": EXAMPLE_AT,
                **_session(PumpStatus, 42)})),
        ],
        "gateway_status": [("birth", _gateway_status("online", 2)),
                           ("last will", _gateway_status("offline", 1))],
        "quarantine": [("checksum", Quarantined(
            quarantine_id="q1", source="socket://127.0.0.1:7000", reason_kind="checksum",
            reason="CRC-32 mismatch", raw_hex="2450", received_at=EXAMPLE_AT))],
        "acknowledgement": [("acknowledge", Acknowledgement(
            alert_id="P0001:low_reservoir:1", by="nurse.jones", note="refill booked 14:00"))],
        "ack_refusal": [("foreign by", AckRefusal(
            username="nurse.jones", alert_id="P0001:low_reservoir:1", reason_kind="by_mismatch",
            reason="by 'dr.smith' is not the MQTT user of the ack topic 'nurse.jones'",
            at=EXAMPLE_AT))],
    }  # fmt: skip


# kind -> (message id, one-line summary of when it is published)
MESSAGES: Final[dict[str, tuple[str, str]]] = {
    "reading": ("reading", "Every accepted periodic reading of a pump."),
    "info": ("deviceInfo", "The pump's identity and programming: at connect and on change."),
    "event": ("deviceEvent", "A device event: refill, bolus, motor stall, ERI, ..."),
    "alert": ("alertTransition", "An alert starts, updates, is acknowledged or ends."),
    "active_alerts": ("activeAlerts", "The alerts not yet ended, after every change."),
    "pump_status": ("pumpStatus", "Telemetry ok/lost and the latest key values."),
    "gateway_status": ("gatewayStatus", "Birth `online`; last will or clean stop `offline`."),
    "quarantine": ("quarantined", "A frame that failed decoding or validation, with its reason."),
    "acknowledgement": ("acknowledgement", "An operator has seen an alert (never clears it)."),
    "ack_refusal": ("ackRefusal", "Why the gateway refused an acknowledgement, with its reason."),
}
GATEWAY_STATUS_TEXT: Final = (
    "On every (re)connect the gateway subscribes to the acknowledgement topics first, then "
    "publishes its birth (`state: online`, retained): seeing `online` also means it is listening "
    "for acknowledgements. Its MQTT last will is the same message with `state: offline`, which "
    "the broker publishes when the gateway vanishes (after 1.5 x the keep-alive without "
    "traffic). Birth and will are built anew for every connection, so each birth's `seq` is "
    "greater than the will registered with the previous connection. A clean stop ends with "
    "`offline` too. A new `session_id` means the gateway restarted; `seq` counts status "
    "messages within a session."
)


def _pump_channel(kind: str, title: str, description: str) -> dict[str, Any]:
    address = topic_for(kind, "{pump_id}", PLACEHOLDERS)
    return _channel(address, kind, title, description, ["pump"])


def ingest_filters() -> list[str]:
    """The central ingest workers' shared subscriptions, with placeholders for group and prefix."""
    return subscriptions("{group}", "{prefix}")


def matches(topic_filter: str, address: str) -> bool:
    """Whether an MQTT topic filter (`+`, `#`) matches a channel address level by level."""
    wanted, levels = topic_filter.split("/"), address.split("/")
    for index, level in enumerate(wanted):
        if level == "#":
            return True
        if index >= len(levels) or level not in ("+", levels[index]):
            return False
    return len(wanted) == len(levels)


def _ingested(address: str) -> bool:
    shared = (f.split("/", 2)[2] for f in ingest_filters())  # strip `$share/{group}/`
    return any(matches(topic_filter, address) for topic_filter in shared)


def _channel(
    address: str, kind: str, title: str, description: str, tags: list[str]
) -> dict[str, Any]:
    message_id = MESSAGES[kind][0]
    derived = [("retained", is_retained(kind)), ("ingest", _ingested(address))]
    return {
        "address": address,
        "title": title,
        "description": description,
        "parameters": {name: spec for name, spec in PARAMETERS.items() if f"{{{name}}}" in address},
        "messages": {message_id: {"$ref": f"#/components/messages/{message_id}"}},
        "tags": [{"name": name} for name in [*tags, *(name for name, on in derived if on)]],
        "x-pumpgw-kind": kind,
    }


def channels() -> dict[str, dict[str, Any]]:
    """Every topic of the tree, keyed by channel id."""
    gateway_alerts = topic_for("alert", GATEWAY_PUMP_ID, PLACEHOLDERS)
    gateway_active = topic_for("active_alerts", GATEWAY_PUMP_ID, PLACEHOLDERS)
    return {
        "pumpTelemetry": _pump_channel("reading", "Pump telemetry", MESSAGES["reading"][1]),
        "pumpInfo": _pump_channel("info", "Pump identity and programming",
                                  MESSAGES["info"][1]),
        "pumpEvents": _pump_channel("event", "Pump events", MESSAGES["event"][1]),
        "pumpAlerts": _pump_channel(
            "alert", "Pump alert transitions",
            "Every transition of the pump's alerts (IHE PCD ACM vocabulary). Deduplicate on "
            "`transition_id`; `alert_id` is stable for the alert's life, and an `update` may "
            "raise its priority and kind in place (low to empty reservoir). A transition with "
            "`phase: acknowledged` is the receipt of an operator's acknowledgement. An "
            "unacknowledged PH/PM alert is re-announced with `escalation_level` 1, 2, ...: a "
            "second audience keeps `escalation_level >= 1` and follows that alert to its end."),
        "pumpActiveAlerts": _pump_channel("active_alerts", "Pump active alerts",
                                          MESSAGES["active_alerts"][1]),
        "pumpStatus": _pump_channel("pump_status", "Pump status",
                                    MESSAGES["pump_status"][1]),
        "gatewayStatus": _channel(status_topic(PLACEHOLDERS), "gateway_status",
                                  "Gateway status: birth and last will", GATEWAY_STATUS_TEXT,
                                  ["gateway"]),
        "gatewayAlerts": _channel(gateway_alerts, "alert", "Gateway technical alerts",
                                  f"The gateway's own technical alerts (outbox near full, ...), "
                                  f"with `pump_id` `{GATEWAY_PUMP_ID}`.", ["gateway"]),
        "gatewayActiveAlerts": _channel(gateway_active, "active_alerts",
                                        "Gateway active technical alerts",
                                        f"The gateway's technical alerts not yet ended, with "
                                        f"`pump_id` `{GATEWAY_PUMP_ID}`.", ["gateway"]),
        "deadletter": _channel(deadletter_topic(PLACEHOLDERS), "quarantine",
                               "Dead letters (quarantine)",
                               "Every frame that failed decoding or validation, with its reason; "
                               "the same record is kept in the gateway's local quarantine.",
                               ["gateway"]),
        "ackRefusals": _channel(ack_refusal_topic(PLACEHOLDERS), "ack_refusal",
                                "Refused acknowledgements",
                                "Every acknowledgement the gateway refused (foreign `by`, the "
                                "deprecated topic, a retained ack, an unknown or ended alert, a "
                                "user not allowed), with its reason, so a console can show it.",
                                ["gateway"]),
        "acknowledgements": _channel(
            ACK_ADDRESS, "acknowledgement", "Operators' acknowledgements",
            f"Operators publish one Acknowledgement per alert here, QoS {QOS}, **not retained**, "
            f"at most {MAX_ACK_BYTES} bytes; `username` must be the publishing client's own MQTT "
            "user (the broker refuses any other). Acknowledging records that a person has seen "
            "the alert; it never clears the pump's own alarm.", ["operator"]),
        "legacyAcknowledgements": _channel(
            LEGACY_ACK_ADDRESS, "acknowledgement", "Deprecated: the shared acknowledgement topic",
            "Deprecated and refused: an acknowledgement published here is not applied, because "
            "the topic does not tell who published it. Publish to "
            f"`{ACK_ADDRESS}` instead.", ["operator", "deprecated"]),
    }  # fmt: skip


def _operation_bindings(retained: bool) -> dict[str, Any]:
    return {"mqtt": {"qos": QOS, "retain": retained, "bindingVersion": MQTT_BINDING_VERSION}}


def _retained_text(retained: bool) -> str:
    return "retained" if retained else "not retained"


def operations(channel_map: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gateway sends on every channel but the acknowledgement ones, where it receives."""
    result: dict[str, dict[str, Any]] = {}
    for channel_id, channel in channel_map.items():
        if "operator" in {tag["name"] for tag in channel["tags"]}:
            continue
        kind = channel["x-pumpgw-kind"]
        message_id = MESSAGES[kind][0]
        retained = is_retained(kind)
        result[f"send{channel_id[0].upper()}{channel_id[1:]}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"{channel['title']}: QoS {QOS}, {_retained_text(retained)}.",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
            "bindings": _operation_bindings(retained),
        }
    result["receiveAcknowledgement"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/acknowledgements"},
        "summary": "Apply an operator's acknowledgement; the receipt is an `acknowledged` "
        "transition.",
        "description": (
            "The gateway validates the Acknowledgement (and `gateway.ack_allowed` if set), then "
            "publishes an AlertTransition with `phase: acknowledged` and `inactivation: "
            "alert-acknowledged` on the alert's `alerts` topic (the pump's, or the gateway's for "
            "its technical alerts) and updates `alerts/active`. That transition is the receipt: "
            "if it does not arrive, the acknowledgement was not applied; a refusal is published "
            "with its reason on `gateway/acks/refused`. Show an alert as "
            "acknowledged only when the receipt arrives, never optimistically. The gateway keeps "
            "a persistent session (`mqtt.session_expiry_s`), so an acknowledgement published "
            "while it is offline is applied when it returns, until the session expires."
        ),
        "messages": [{"$ref": "#/channels/acknowledgements/messages/acknowledgement"}],
        "bindings": _operation_bindings(retained=False),
        "reply": {
            "channel": {"$ref": "#/channels/pumpAlerts"},
            "messages": [{"$ref": "#/channels/pumpAlerts/messages/alertTransition"}],
        },
    }
    return result  # fmt: skip


def _rewrite_refs(node: Any) -> Any:
    """A copy of a schema with `#/$defs/X` references pointing at `#/components/schemas/X`."""
    if isinstance(node, dict):
        return {
            key: (
                COMPONENT_SCHEMA_REF + value.removeprefix(DEFS_REF)
                if key == "$ref" and isinstance(value, str) and value.startswith(DEFS_REF)
                else _rewrite_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def embedded_schema(file_schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JSON Schema file's payload schema and its definitions, ready for `components/schemas`.

    `$schema` and `$id` are dropped (the `$id` would change the base of every reference);
    `$defs` are returned apart, and all references are rewritten to point at the components.
    """
    body = {k: v for k, v in file_schema.items() if k not in ("$schema", "$id", "$defs")}
    defs = {name: _rewrite_refs(schema) for name, schema in file_schema.get("$defs", {}).items()}
    return _rewrite_refs(body), defs


def _add_schema(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Add one component schema; a name taken by a different schema is a bug, never a guess."""
    known = schemas.setdefault(name, schema)
    if _without_title(known) != _without_title(schema):
        raise ValueError(f"two different schemas are named {name!r} in the message models")


def _without_title(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k != "title"}


def component_schemas(file_schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every payload schema under its model's name, then every shared definition."""
    payloads: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for kind, file_schema in sorted(file_schemas.items()):
        body, defs = embedded_schema(file_schema)
        _add_schema(payloads, MODELS_BY_KIND[kind].__name__, body)
        for name, schema in sorted(defs.items()):
            _add_schema(shared, name, schema)
    for name, schema in shared.items():
        _add_schema(payloads, name, schema)
    return dict(sorted(payloads.items()))


def _message(kind: str, file_schema: dict[str, Any]) -> dict[str, Any]:
    summary = MESSAGES[kind][1]
    model = MODELS_BY_KIND[kind]
    message: dict[str, Any] = {
        "name": model.__name__,
        "title": model.__name__,
        "summary": summary,
        "description": (
            f"{(model.__doc__ or '').strip().splitlines()[0]} Payload: the JSON of "
            f"`schemas.models.{model.__name__}`; the same schema as "
            f"`schemas/json/{kind}.schema.json` (`$id` `{file_schema['$id']}`)."
        ),
        "contentType": CONTENT_TYPE,
        "payload": {"$ref": f"{COMPONENT_SCHEMA_REF}{model.__name__}"},
        "bindings": {
            "mqtt": {
                "payloadFormatIndicator": 1,
                "contentType": CONTENT_TYPE,
                "bindingVersion": MQTT_BINDING_VERSION,
            }
        },
        "examples": [
            {"name": name, "payload": example.model_dump(mode="json")}
            for name, example in examples()[kind]
        ],
    }
    if kind not in ("gateway_status", "acknowledgement"):
        message["headers"] = HEADERS_SCHEMA
    return message


def servers() -> dict[str, Any]:
    """The broker's listeners (deploy/mosquitto), with the gateway's session on the MQTT ones."""
    defaults = MqttSettings()
    gateway_session = {
        "mqtt": {
            "clientId": "pumpgw-{site}-{station}",
            "cleanSession": False,
            "lastWill": {
                "topic": status_topic(PLACEHOLDERS),
                "qos": QOS,
                "message": "GatewayStatus with state offline (see the gatewayStatus channel)",
                "retain": True,
            },
            "keepAlive": defaults.keepalive_s,
            "sessionExpiryInterval": defaults.session_expiry_s,
            "bindingVersion": MQTT_BINDING_VERSION,
        }
    }
    host = {"host": {"description": "The broker's host name.", "default": "localhost"}}
    password = {"$ref": "#/components/securitySchemes/userPassword"}
    certificate = {"$ref": "#/components/securitySchemes/clientCertificate"}
    listeners: dict[str, tuple[str, str, str, list[Any]]] = {
        "mqtt": ("{host}:1883", "mqtt", "MQTT over TCP (`mqtt://`).", [password]),
        "mqtts": ("{host}:8883", "secure-mqtt", "MQTT over TLS (`mqtts://`, docs/security.md); "
                  "a client certificate is accepted where the broker requires one.",
                  [password, certificate]),
        "websockets": ("{host}:9001", "ws", "MQTT over WebSocket, for browser dashboards; the "
                       "gateway itself connects over `mqtt` or `mqtts`.", [password]),
    }  # fmt: skip
    result: dict[str, Any] = {}
    for name, (address, protocol, description, security) in listeners.items():
        result[name] = {
            "host": address,
            "protocol": protocol,
            "protocolVersion": defaults.protocol,
            "description": description,
            "variables": host,
            "security": security,
        }
        if protocol != "ws":
            result[name]["bindings"] = gateway_session
    return result


def _info_description() -> str:
    return (
        f"**{INTENDED_USE}**\n\n"
        "The MQTT interface of one pumpgw gateway: everything a station knows, published under "
        f"`{ROOT}` from the gateway's durable outbox (QoS {QOS}, at least once: "
        "deduplicate on the ids named per message), and the topics where operators acknowledge "
        "alerts. Retained topics hold the current state, so a late subscriber sees it at once. "
        "Use the payloads' times (`received_at`, `at`), not the arrival time, for age and order. "
        f"A dashboard subscribes to `{subscription_filter(PLACEHOLDERS)}`.\n\n"
        "Central ingest workers (`pumpgw ingest`, `[ingest] group`) take the channels tagged "
        "`ingest` through MQTT 5 shared subscriptions, so the workers of one group split the "
        f"load: {', '.join(f'`{f}`' for f in ingest_filters())}.\n\n"
        "Generated by `python -m schemas.export` from the code; docs/topics.md is the prose."
    )


def document(file_schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The AsyncAPI document, given the JSON Schema of every kind (from `schema_for`)."""
    channel_map = channels()
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": DOCUMENT_ID,
        "info": {
            "title": "pumpgw MQTT topics",
            "version": str(SCHEMA_VERSION),
            "description": _info_description(),
            "license": {"name": "Apache-2.0"},
            "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": servers(),
        "channels": channel_map,
        "operations": operations(channel_map),
        "components": {
            "schemas": component_schemas(file_schemas),
            "messages": {
                MESSAGES[kind][0]: _message(kind, file_schemas[kind]) for kind in MESSAGES
            },
            "securitySchemes": {
                "userPassword": {
                    "type": "userPassword",
                    "description": "The broker's user name and password (deploy/mosquitto: "
                    "users `gateway`, `ingest`, `dashboard`, rights in `acl`). An operator's "
                    "user name is also the last level of the acknowledgement topic.",
                },
                "clientCertificate": {
                    "type": "X509",
                    "description": "A client certificate for mutual TLS (`[mqtt.tls] cert_file`, "
                    "`key_file`).",
                },
            },
        },
    }
