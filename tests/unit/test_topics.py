"""Topic naming: the documented tree, the retain set, and validation of every segment."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.records import GATEWAY_PUMP_ID, KINDS
from gateway.topics import (
    LEAF_KINDS,
    AckOrigin,
    TopicBase,
    TopicParts,
    ack_filter,
    ack_origin,
    ack_refusal_topic,
    ack_topic,
    deadletter_topic,
    is_retained,
    legacy_ack_topic,
    parse_topic,
    pump_filter,
    status_topic,
    subscription_filter,
    topic_for,
)

BASE = TopicBase(site="north", station="ward-3")


@pytest.mark.parametrize(
    ("kind", "leaf"),
    [
        ("reading", "pumps/P0001/telemetry"),
        ("info", "pumps/P0001/info"),
        ("event", "pumps/P0001/events"),
        ("alert", "pumps/P0001/alerts"),
        ("active_alerts", "pumps/P0001/alerts/active"),
        ("pump_status", "pumps/P0001/status"),
        ("gateway_status", "gateway/status"),
        ("quarantine", "deadletter"),
    ],
)
def test_topic_for_places_each_kind_in_the_documented_tree(kind: str, leaf: str) -> None:
    assert topic_for(kind, "P0001", BASE) == f"pumpgw/north/ward-3/{leaf}"


def test_every_known_kind_has_a_topic() -> None:
    assert {k for k in KINDS if topic_for(k, "P1", BASE)} == KINDS


def test_gateway_alerts_go_to_the_gateway_subtree() -> None:
    assert topic_for("alert", GATEWAY_PUMP_ID, BASE) == "pumpgw/north/ward-3/gateway/alerts"
    assert (
        topic_for("active_alerts", GATEWAY_PUMP_ID, BASE)
        == "pumpgw/north/ward-3/gateway/alerts/active"
    )


def test_gateway_pump_id_cannot_overwrite_the_gateway_status() -> None:
    with pytest.raises(ValueError, match="_gateway"):
        topic_for("pump_status", GATEWAY_PUMP_ID, BASE)


def test_station_level_kinds_ignore_the_pump_id() -> None:
    assert topic_for("quarantine", None, BASE) == deadletter_topic(BASE)
    assert topic_for("gateway_status", None, BASE) == status_topic(BASE)


def test_fixed_topics_and_filters() -> None:
    base = TopicBase(site="s", station="t", prefix="acme")
    assert ack_topic(base, "nurse.jones") == "acme/s/t/ack/nurse.jones"
    assert ack_filter(base) == "acme/s/t/ack/+"
    assert legacy_ack_topic(base) == "acme/s/t/ack"
    assert ack_refusal_topic(base) == "acme/s/t/gateway/acks/refused"
    assert status_topic(base) == "acme/s/t/gateway/status"
    assert subscription_filter(base) == "acme/s/t/#"
    assert pump_filter(base, "P9") == "acme/s/t/pumps/P9/#"
    assert base.root == "acme/s/t"


def test_retained_kinds_are_exactly_the_state_messages() -> None:
    retained = {k for k in KINDS if is_retained(k)}
    assert retained == {"info", "pump_status", "active_alerts", "gateway_status"}


def test_unknown_kind_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(ValueError, match=r"kind: 'bogus'.*reading"):
        topic_for("bogus", "P1", BASE)


def test_pump_record_without_pump_id_is_refused() -> None:
    with pytest.raises(ValueError, match="pump_id"):
        topic_for("reading", None, BASE)


@pytest.mark.parametrize("bad", ["a+b", "a#", "a/b", "a\x00b", "", "$SYS"])
@pytest.mark.parametrize(
    ("field", "key"),
    [("site", "gateway.site"), ("station", "gateway.station"), ("prefix", "mqtt.topic_prefix")],
)
def test_bad_segment_is_refused_naming_the_key(bad: str, field: str, key: str) -> None:
    values = {"site": "s", "station": "t", "prefix": "p", field: bad}
    with pytest.raises(ValueError, match=f"^{key}:"):
        TopicBase(**values)


@pytest.mark.parametrize("bad", ["P/1", "P+", "#", "\x00"])
def test_bad_pump_id_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^pump_id:"):
        topic_for("reading", bad, BASE)


def test_topic_base_is_immutable() -> None:
    with pytest.raises(AttributeError):
        BASE.site = "other"  # type: ignore[misc]



def test_the_acknowledging_user_is_the_last_level_of_the_ack_topic() -> None:
    assert ack_origin(BASE, ack_topic(BASE, "nurse.jones")) == AckOrigin("nurse.jones")
    assert ack_origin(BASE, legacy_ack_topic(BASE)) == AckOrigin(None, legacy=True)
    assert ack_origin(BASE, f"{BASE.root}/ack/nurse.jones/refused") is None
    assert ack_origin(BASE, f"{BASE.root}/ack/") is None
    assert ack_origin(BASE, "pumpgw/north/ward-4/ack/nurse.jones") is None
    assert ack_origin(BASE, f"{BASE.root}/pumps/P1/alerts") is None


def test_an_ack_topic_cannot_be_built_for_a_name_that_is_not_one_topic_level() -> None:
    with pytest.raises(ValueError, match="username"):
        ack_topic(BASE, "a/b")


SEGMENTS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-",
                   min_size=1, max_size=20)  # fmt: skip


@given(site=SEGMENTS, station=SEGMENTS, pump_id=SEGMENTS, kind=st.sampled_from(sorted(
    set(LEAF_KINDS.values()))), prefix=SEGMENTS)  # fmt: skip
def test_parse_topic_reads_back_what_topic_for_wrote(
    site: str, station: str, pump_id: str, kind: str, prefix: str
) -> None:
    assume(pump_id != GATEWAY_PUMP_ID)  # its topics are the gateway's: the next test
    base = TopicBase(site=site, station=station, prefix=prefix)
    topic = topic_for(kind, pump_id, base)
    assert parse_topic(topic, prefix) == TopicParts(site, station, pump_id, kind)


@given(site=SEGMENTS, station=SEGMENTS, prefix=SEGMENTS)
def test_parse_topic_reads_the_gateway_alerts_topic(site: str, station: str, prefix: str) -> None:
    base = TopicBase(site=site, station=station, prefix=prefix)
    topic = topic_for("alert", GATEWAY_PUMP_ID, base)
    assert parse_topic(topic, prefix) == TopicParts(site, station, GATEWAY_PUMP_ID, "alert")
    assert parse_topic(topic, prefix + "x") is None
