"""One reservoir alert escalating in place (low to empty), and the escalation level of
unacknowledged alerts: table-driven, each row a situation a ward sees.

Times: `t_s` is seconds after T0 on the pump's clock; the gateway receives at the same instant.
"""

from __future__ import annotations

import json
from typing import Final

import pytest

from gateway.alert_settings import RulesConfig, RuleSettings
from gateway.fhir_bundles import alert_concept
from gateway.hl7_messages import Envelope, pcd04_message
from gateway.rules import AlertEngine
from schemas.models import AlertTransition, Inactivation, Phase, Priority, PumpState
from tests.unit.test_rules import Feed, ack, at, feed_with

RESERVOIR: Final = frozenset({"low_reservoir", "empty_reservoir"})
ACK: Final = -1.0
"""A step of the table that acknowledges the reservoir alert instead of sending a reading."""
LOW, EMPTY = ("low_reservoir", Priority.MEDIUM), ("empty_reservoir", Priority.HIGH)
S, U, A, E = Phase.START, Phase.UPDATE, Phase.ACKNOWLEDGED, Phase.END


def play(steps: tuple[float, ...]) -> list[AlertTransition]:
    """Readings of the given reservoir volumes a minute apart (ACK acknowledges instead)."""
    f = Feed(AlertEngine(RulesConfig()))
    out: list[AlertTransition] = []
    for minute, step in enumerate(steps, start=1):
        if step == ACK:
            alert_id = next(t.alert_id for t in out if t.alert_kind in RESERVOIR)
            out += ack(f.engine, alert_id, minute * 60.0)
        else:
            out += f.reading(minute * 60.0, step)
    return [t for t in out if t.alert_kind in RESERVOIR]


CASES: Final = {
    "low, then empty: one alert, its priority raised in place": (
        (5.0, 1.9, 0.9),
        [(S, *LOW), (U, *EMPTY)],
    ),
    "found empty at once: it starts at its empty level": (
        (5.0, 0.5),
        [(S, *EMPTY)],
    ),
    "empty, acknowledged, refilled: the refill ends it": (
        (1.9, 0.9, ACK, 18.0),
        [(S, *LOW), (U, *EMPTY), (A, *EMPTY), (E, *EMPTY)],
    ),
    "empty, refilled before anyone saw it: latched until acknowledged": (
        (1.9, 0.9, 18.0, ACK),
        [(S, *LOW), (U, *EMPTY), (U, *EMPTY), (A, *EMPTY), (E, *EMPTY)],
    ),
    "low acknowledged, then empty: a new acknowledgement is needed": (
        (1.9, ACK, 0.9, ACK),
        [(S, *LOW), (A, *LOW), (U, *EMPTY), (A, *EMPTY)],
    ),
    "empty level holds until acknowledged, then returns to low": (
        (0.5, 2.5, ACK, 2.5),
        [(S, *EMPTY), (A, *EMPTY), (U, *LOW)],
    ),
    "empty within its hysteresis stays empty": (
        (0.9, ACK, 1.5, 2.0),
        [(S, *EMPTY), (A, *EMPTY)],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_low_and_empty_reservoir_are_one_alert(case: str) -> None:
    steps, expected = CASES[case]
    out = play(steps)
    assert [(t.phase, t.alert_kind, t.priority) for t in out] == expected
    assert len({t.alert_id for t in out}) == 1


def test_the_escalation_says_empty_and_asks_for_a_new_acknowledgement() -> None:
    out = play((1.9, ACK, 0.9))
    low, acked, empty = out
    assert acked.acknowledged_by == "nurse.kim"
    assert (empty.inactivation, empty.acknowledged_by) == (Inactivation.ENABLED, None)
    assert empty.text.startswith("Empty reservoir (escalated in place: the reservoir is now empty)")
    assert (empty.value, empty.threshold, empty.unit) == (0.9, 1.0, "mL")
    assert empty.alert_id == low.alert_id


@pytest.mark.parametrize(
    ("index", "mdc"),
    [(0, "196670^MDC_EVT_LO^MDC"), (1, "196634^MDC_EVT_EMPTY^MDC")],
)
def test_the_escalation_maps_to_the_empty_event_code(index: int, mdc: str) -> None:
    transition = play((1.9, 0.9))[index]
    assert f"|{mdc}|" in pcd04_message(transition, Envelope()).text
    code = mdc.split("^")[0]
    assert alert_concept(transition.alert_kind)["coding"][0]["code"] == code


def test_time_to_acknowledge_of_the_empty_level_counts_from_the_escalation() -> None:
    f = Feed(AlertEngine(RulesConfig()))
    (low,) = f.reading(0, 1.9)
    f.reading(600, 0.9)
    ack(f.engine, low.alert_id, 900)
    assert f.engine.acknowledgement_delays() == {Priority.HIGH: (1, 300.0, 300.0)}


# -- escalation level of unacknowledged alerts ---------------------------------------------

LEVELS: Final = {
    # ticks (gateway seconds after the start), acknowledged at (or None), expected levels
    "every 15 min unacknowledged, one level up": ((899, 900, 1799, 1800, 2700), None, [1, 2, 3]),
    "acknowledged: no further level": ((900, 1800, 2700), 1000.0, [1]),
    "acknowledged at once: never escalated": ((900, 1800), 60.0, []),
}


@pytest.mark.parametrize("case", LEVELS)
def test_reannouncements_carry_the_escalation_level(case: str) -> None:
    ticks, acked_s, expected = LEVELS[case]
    f = feed_with(telemetry_lost_after_s=86_400.0)
    (start,) = f.reading(0, pump_state=PumpState.STALLED)
    assert start.escalation_level == 0
    out: list[AlertTransition] = []
    for tick_s in ticks:
        if acked_s is not None and tick_s > acked_s and not any(t.phase is A for t in out):
            out += ack(f.engine, start.alert_id, acked_s)
        out += f.engine.on_tick(at(tick_s))
    levels = [t.escalation_level for t in out if t.phase is U]
    assert levels == expected
    for t in out:
        if t.phase is U:
            assert f"escalation level {t.escalation_level}:" in t.text


def test_later_transitions_keep_the_level_reached() -> None:
    f = feed_with(telemetry_lost_after_s=86_400.0)
    (start,) = f.reading(0, pump_state=PumpState.STALLED)
    f.engine.on_tick(at(900))
    (acked,) = ack(f.engine, start.alert_id, 1000)
    assert acked.escalation_level == 1
    (active,) = f.engine.active_alerts(start.pump_id)
    assert active.escalation_level == 1


def test_the_escalation_level_survives_a_restart() -> None:
    config = RulesConfig(defaults=RuleSettings(telemetry_lost_after_s=86_400.0))
    f = Feed(AlertEngine(config))
    f.reading(0, pump_state=PumpState.STALLED)
    f.engine.on_tick(at(900))
    restored = AlertEngine(config, f.engine.state_rows())
    (again,) = restored.on_tick(at(1800))
    assert again.escalation_level == 2


def test_a_zero_interval_turns_reannouncement_off() -> None:
    f = feed_with(telemetry_lost_after_s=86_400.0, reannounce_after_s=0.0)
    f.reading(0, pump_state=PumpState.STALLED)
    assert [t for s in range(900, 9000, 900) for t in f.engine.on_tick(at(s))] == []


def test_a_saved_state_with_two_reservoir_alerts_hands_empty_over_to_the_one_alert() -> None:
    """A state saved before consolidation: a separate empty alert latches and then ends."""
    f = Feed(AlertEngine(RulesConfig(), salt=b"s" * 16))
    (start,) = f.reading(60, 0.9)
    rows = f.engine.state_rows()
    key = f"alert_engine/pump/{f.pump_id}"
    pump = json.loads(rows[key])
    low = pump["alerts"]["low_reservoir"]
    old_empty = {**low, "alert_id": f"{f.pump_id}:empty_reservoir:legacy"}
    low.update(kind="low_reservoir", priority="PM", title="Low reservoir",
               alert_id=f"{f.pump_id}:low_reservoir:legacy")  # fmt: skip
    pump["alerts"]["empty_reservoir"] = old_empty
    pump["on"].append("empty_reservoir")
    f.engine = AlertEngine(RulesConfig(), {**rows, key: json.dumps(pump).encode()})
    out = f.reading(120, 0.8)
    assert [(t.alert_id.rsplit(":", 1)[1], t.phase, t.alert_kind, t.state.value) for t in out] == [
        ("legacy", U, "empty_reservoir", "active"),  # the low alert, escalated in place
        ("legacy", U, "empty_reservoir", "latched"),  # the old empty alert, latched
    ]
    assert out[0].alert_id.endswith("low_reservoir:legacy")
    (acked, end) = ack(f.engine, old_empty["alert_id"], 180)
    assert (acked.phase, end.phase) == (A, E)
    assert [t.alert_kind for t in f.engine.active_alerts(f.pump_id)] == ["empty_reservoir"]
    assert start.alert_id != out[0].alert_id
