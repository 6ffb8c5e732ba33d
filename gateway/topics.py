"""MQTT topic naming: the topic tree of one station under a configurable prefix.

Pure: no I/O. docs/topics.md describes every topic, its payload, QoS and retain flag.

    {prefix}/{site}/{station}/pumps/{pump_id}/telemetry      Reading
    {prefix}/{site}/{station}/pumps/{pump_id}/info           DeviceInfo (retained)
    {prefix}/{site}/{station}/pumps/{pump_id}/events         DeviceEvent
    {prefix}/{site}/{station}/pumps/{pump_id}/alerts         AlertTransition
    {prefix}/{site}/{station}/pumps/{pump_id}/alerts/active  ActiveAlerts (retained)
    {prefix}/{site}/{station}/pumps/{pump_id}/status         PumpStatus (retained)
    {prefix}/{site}/{station}/gateway/status                 GatewayStatus (retained, birth/will)
    {prefix}/{site}/{station}/gateway/alerts                 AlertTransition, pump "_gateway"
    {prefix}/{site}/{station}/gateway/alerts/active          ActiveAlerts, "_gateway" (retained)
    {prefix}/{site}/{station}/gateway/acks/refused           AckRefusal (not retained)
    {prefix}/{site}/{station}/deadletter                     Quarantined
    {prefix}/{site}/{station}/ack/{username}                 Acknowledgement (operators publish)

The last level of an ack topic is the publisher's MQTT user name: the broker's ACL lets each
user publish only on its own (`.../ack/%u`), so it is the acknowledging identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gateway.records import GATEWAY_PUMP_ID, KINDS, RETAINED_KINDS

DEFAULT_PREFIX: Final = "pumpgw"
FORBIDDEN_CHARS: Final = frozenset("+#/\x00")
MAX_SEGMENT_CHARS: Final = 128

PUMP_LEAVES: Final[dict[str, str]] = {
    "reading": "telemetry",
    "info": "info",
    "event": "events",
    "alert": "alerts",
    "active_alerts": "alerts/active",
    "pump_status": "status",
}
GATEWAY_LEAVES: Final[dict[str, str]] = {
    "alert": "alerts",
    "active_alerts": "alerts/active",
}

LEAF_KINDS: Final[dict[str, str]] = {"telemetry": "reading", "events": "event", "alerts": "alert"}
"""Pump topic leaves the workers take, and the record kind each carries (docs/topics.md)."""


def segment_problem(value: str) -> str | None:
    """What makes `value` unusable as one topic level, or None if it is fine."""
    if not value:
        return "must not be empty (it becomes a topic level)"
    if len(value) > MAX_SEGMENT_CHARS:
        return f"longer than {MAX_SEGMENT_CHARS} characters"
    bad = sorted(FORBIDDEN_CHARS.intersection(value))
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"{value!r} contains {shown}; '+', '#', '/' and NUL are refused"
    if value.startswith("$"):
        return f"{value!r} starts with '$', which brokers reserve ($SYS)"
    return None


def check_segment(key: str, value: str) -> str:
    """Return `value` if it is usable as one topic level; raise ValueError naming `key`."""
    problem = segment_problem(value)
    if problem is not None:
        raise ValueError(f"{key}: {problem}")
    return value


@dataclass(frozen=True, slots=True)
class TopicBase:
    """The station's place in the tree; validated when built."""

    site: str
    station: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_segment("mqtt.topic_prefix", self.prefix)
        check_segment("gateway.site", self.site)
        check_segment("gateway.station", self.station)

    @property
    def root(self) -> str:
        """`{prefix}/{site}/{station}`: every topic of this station starts here."""
        return f"{self.prefix}/{self.site}/{self.station}"


def is_retained(kind: str) -> bool:
    """Whether records of this kind are published with the retain flag."""
    return kind in RETAINED_KINDS


def topic_for(kind: str, pump_id: str | None, base: TopicBase) -> str:
    """The topic of one outbox record; raise ValueError for an unknown kind or a bad pump id."""
    if kind == "gateway_status":
        return status_topic(base)
    if kind == "quarantine":
        return deadletter_topic(base)
    if kind not in PUMP_LEAVES:
        raise ValueError(f"kind: {kind!r} has no topic (known: {', '.join(sorted(KINDS))})")
    if pump_id is None:
        raise ValueError(f"pump_id: a {kind!r} record needs a pump id")
    if pump_id == GATEWAY_PUMP_ID:
        return _gateway_topic(kind, base)
    check_segment("pump_id", pump_id)
    return f"{base.root}/pumps/{pump_id}/{PUMP_LEAVES[kind]}"


def _gateway_topic(kind: str, base: TopicBase) -> str:
    leaf = GATEWAY_LEAVES.get(kind)
    if leaf is None:
        raise ValueError(f"kind: no {kind!r} records exist for pump {GATEWAY_PUMP_ID}")
    return f"{base.root}/gateway/{leaf}"


def status_topic(base: TopicBase) -> str:
    """Retained GatewayStatus: birth `online`, last will `offline`."""
    return f"{base.root}/gateway/status"


def deadletter_topic(base: TopicBase) -> str:
    """Quarantined frames with their reason."""
    return f"{base.root}/deadletter"


def ack_topic(base: TopicBase, username: str) -> str:
    """Where the MQTT user `username` publishes its Acknowledgement JSON."""
    return f"{ack_filter(base).removesuffix('+')}{check_segment('username', username)}"


def ack_filter(base: TopicBase) -> str:
    """The gateway's subscription for acknowledgements: one topic per MQTT user."""
    return f"{base.root}/ack/+"


def legacy_ack_topic(base: TopicBase) -> str:
    """The ack topic before acknowledgements were bound to the MQTT user: refused with a reason."""
    return f"{base.root}/ack"


def ack_refusal_topic(base: TopicBase) -> str:
    """Where the gateway says why it refused an acknowledgement (AckRefusal, not retained)."""
    return f"{base.root}/gateway/acks/refused"


@dataclass(frozen=True, slots=True)
class AckOrigin:
    """Who sent a message the gateway received on an ack topic."""

    username: str | None
    """The topic's last level (the broker-enforced MQTT user name); None on the legacy topic."""
    legacy: bool = False


def ack_origin(base: TopicBase, topic: str) -> AckOrigin | None:
    """Classify a received topic: a per-user ack topic, the legacy one, or None (not an ack)."""
    if topic == legacy_ack_topic(base):
        return AckOrigin(None, legacy=True)
    head = ack_filter(base).removesuffix("+")
    username = topic.removeprefix(head)
    if username == topic or not username or "/" in username:
        return None
    return AckOrigin(username)


def pump_filter(base: TopicBase, pump_id: str) -> str:
    """Everything about one pump."""
    check_segment("pump_id", pump_id)
    return f"{base.root}/pumps/{pump_id}/#"


def subscription_filter(base: TopicBase) -> str:
    """Everything of this station (a dashboard's subscription)."""
    return f"{base.root}/#"


@dataclass(frozen=True, slots=True)
class TopicParts:
    """What a topic says: the station it came from, the pump and the record kind."""

    site: str
    station: str
    pump_id: str
    kind: str


def parse_topic(topic: str, prefix: str) -> TopicParts | None:
    """Site, station, pump and kind of a telemetry, event or alert topic; None for others."""
    levels = topic.split("/")
    if len(levels) == 6 and levels[0] == prefix and levels[3] == "pumps":
        kind = LEAF_KINDS.get(levels[5])
        if kind is None:
            return None
        return TopicParts(levels[1], levels[2], levels[4], kind)
    if len(levels) == 5 and levels[0] == prefix and levels[3:] == ["gateway", "alerts"]:
        return TopicParts(levels[1], levels[2], GATEWAY_PUMP_ID, "alert")
    return None
