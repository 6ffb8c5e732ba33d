"""PackedProperties: the PUBLISH properties the MQTT sink encodes itself, byte for byte paho's."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.adapters.mqtt_client import PackedProperties


def paho_properties(pairs: list[tuple[str, str]]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    props.UserProperty = pairs
    return props


@pytest.mark.parametrize(
    "pairs",
    [
        [("record_id", "P0001:3fa2c1d0:42")],
        [("record_id", "P0001:3fa2c1d0:42"), ("historical", "true")],
        [("record_id", "x" * 200)],  # property length past 127: a two-byte variable integer
        [("record_id", "pümpe:ß:1")],  # UTF-8 lengths are bytes, not characters
    ],
)
def test_packed_properties_encode_exactly_what_paho_would(pairs: list[tuple[str, str]]) -> None:
    expected = paho_properties(pairs).pack()  # type: ignore[no-untyped-call]
    assert PackedProperties(pairs).pack() == expected


def test_packed_properties_decode_back_to_the_same_user_properties() -> None:
    pairs = [("record_id", "P0001:b:7"), ("historical", "true")]
    decoded = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    decoded.unpack(PackedProperties(pairs).pack())  # type: ignore[no-untyped-call]
    assert getattr(decoded, "UserProperty", None) == pairs
    assert getattr(decoded, "ContentType", None) == "application/json"
    assert getattr(decoded, "PayloadFormatIndicator", None) == 1


def test_packed_properties_print_like_paho_in_debug_logs() -> None:
    pairs = [("record_id", "P0001:b:7")]
    assert str(PackedProperties(pairs)) == str(paho_properties(pairs))
