"""The alert engine's saved state: one row per pump plus one for the engine, only the rows that
changed, an engine rebuilt from its rows that behaves identically, and the single row of
earlier builds read and then replaced."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import pytest

from gateway.config import load_settings
from gateway.outbox import Outbox
from gateway.pipeline import Batch
from gateway.rules import STATE_KEY, AlertEngine, RulesConfig, RuleSettings
from gateway.service import Gateway
from schemas.models import (
    AlarmState,
    AlertTransition,
    AlertType,
    EventKind,
    Phase,
    Priority,
    PumpState,
)
from tests.unit.test_rules import Feed, ack, at, starts

ENGINE: Final = "alert_engine/engine"
P1: Final = "alert_engine/pump/P0001"
P2: Final = "alert_engine/pump/P0002"
SINGLE_ROW: Final = Path(__file__).parents[1] / "data" / "alert_engine_single_row.json"
"""The whole state as an earlier build saved it (`snapshot()`, one row under `alert_engine`):
P0001 with a latched low reservoir alert, P0002 quiet, salt "s" * 16."""
SINGLE_ROW_ALERT: Final = "P0001:low_reservoir:ac9e054f851bae35"
SALT: Final = b"s" * 16


def two_pumps(config: RulesConfig | None = None) -> tuple[AlertEngine, Feed, Feed]:
    engine = AlertEngine(config or RulesConfig(), salt=SALT)
    first, second = Feed(engine), Feed(engine, pump_id="P0002")
    first.reading(0, 10.0)
    second.reading(0, 10.0)
    return engine, first, second


def store(rows: dict[str, bytes], saved: Mapping[str, bytes | None]) -> dict[str, bytes]:
    """Apply a save to `rows` as the outbox does: a None value deletes the row."""
    for key, row in saved.items():
        if row is None:
            rows.pop(key, None)
        else:
            rows[key] = row
    return rows


def canonical(rows: Mapping[str, bytes]) -> dict[str, Any]:
    """The rows as data, with sets (lists of names, dumped in hash order) sorted."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            items = [walk(v) for v in value]
            return sorted(items) if all(isinstance(v, str) for v in items) else items
        return value

    return {key: walk(json.loads(row)) for key, row in rows.items()}


# -- only what changed -------------------------------------------------------------------------


def test_the_first_save_writes_the_engine_row_and_every_pump_then_nothing() -> None:
    engine, _, _ = two_pumps()
    rows = engine.changed_state()
    assert sorted(rows) == [ENGINE, P1, P2]
    assert rows == engine.state_rows()
    assert engine.changed_state() == {}


def test_an_alert_change_saves_only_the_pump_it_belongs_to() -> None:
    engine, first, second = two_pumps()
    engine.changed_state()
    (start,) = starts(first.reading(60, 1.9), "low_reservoir")
    rows = engine.changed_state()
    assert list(rows) == [P1]
    assert rows[P1] == engine.state_rows()[P1]
    assert start.alert_id in (rows[P1] or b"").decode()
    ack(engine, start.alert_id, 70)
    assert list(engine.changed_state()) == [P1]
    second.reading(60, 10.0)  # no alert, but the pump's sequence and windows moved
    assert list(engine.changed_state()) == [P2]


def test_a_quiet_tick_and_an_unknown_acknowledgement_leave_nothing_to_save() -> None:
    engine, _, _ = two_pumps()
    engine.changed_state()
    assert engine.on_tick(at(30)) == []
    assert ack(engine, "P0001:low_reservoir:0123456789abcdef", 40) == []
    assert engine.changed_state() == {}


def test_a_lost_pump_is_saved_when_its_alert_starts_and_not_on_every_tick() -> None:
    engine, _, second = two_pumps(RulesConfig(defaults=RuleSettings(telemetry_lost_after_s=300)))
    second.reading(390, 10.0)
    engine.changed_state()
    (lost,) = engine.on_tick(at(400))
    assert (lost.pump_id, lost.alert_kind, lost.phase) == ("P0001", "telemetry_lost", Phase.START)
    assert list(engine.changed_state()) == [P1]
    assert engine.on_tick(at(401)) == []
    assert engine.changed_state() == {}  # looked at again, unchanged: not rewritten


def test_the_gateways_own_condition_is_saved_as_a_row() -> None:
    engine, _, _ = two_pumps()
    engine.changed_state()
    engine.set_condition(
        "_gateway", "outbox_full", True, priority=Priority.HIGH, alert_type=AlertType.TECHNICAL,
        latching=False, text="full", value=None, threshold=None, unit=None, now=at(10),
    )  # fmt: skip
    assert list(engine.changed_state()) == ["alert_engine/pump/_gateway"]


# -- round trip ----------------------------------------------------------------------------------


def test_an_engine_rebuilt_from_its_saved_rows_behaves_identically() -> None:
    config = RulesConfig(defaults=RuleSettings(telemetry_lost_after_s=3600))
    original, first, second = two_pumps(config)
    saved = store({}, original.changed_state())
    first.reading(60, 5.0)  # refill due
    (low,) = starts(second.reading(60, 1.9), "low_reservoir")
    store(saved, original.changed_state())
    second.reading(120, 18.0)  # refilled: latched until acknowledged
    first.reading(120, pump_state=PumpState.STOPPED)  # a pending delay
    first.event(130, EventKind.BOLUS_DELIVERED, bolus_ml=0.02)
    original.on_tick(at(1000))
    store(saved, original.changed_state())

    restored = AlertEngine(config, saved, salt=b"another salt")
    assert canonical(restored.state_rows()) == canonical(original.state_rows())
    assert restored.changed_state() == {}  # what it read is what is stored
    twins = [replace(f, engine=restored, log=[]) for f in (first, second)]
    for engine, (a, b) in ((original, (first, second)), (restored, twins)):
        out: list[AlertTransition] = []
        out += ack(engine, low.alert_id, 1100)
        out += a.reading(1200, 1.9, pump_state=PumpState.STOPPED)
        out += engine.on_tick(at(5000))
        out += b.reading(5100, 0.5)
        a.log, b.log = out, []
    # The same transitions for each pump. (Across pumps a tick goes in the order the engine
    # learnt of them, which the rows do not keep: a restored engine goes by pump id.)
    for pump_id in ("P0001", "P0002"):
        assert [t for t in twins[0].log if t.pump_id == pump_id] == [
            t for t in first.log if t.pump_id == pump_id
        ]
    assert len(first.log) >= 4
    assert {t.phase for t in first.log} >= {Phase.START, Phase.END, Phase.ACKNOWLEDGED}


# -- deleted rows, unusable rows ---------------------------------------------------------------


def test_rows_of_an_unusable_saved_state_are_deleted_at_the_first_save() -> None:
    engine, _, _ = two_pumps()
    rows = {**engine.state_rows(), P1: b"{not json", "alert_engine_other": b"not ours"}
    with pytest.raises(ValueError, match="Invalid JSON"):
        AlertEngine(RulesConfig(), rows)
    fresh = AlertEngine(RulesConfig(), discard=rows)
    Feed(fresh).reading(0, 10.0)
    saved = fresh.changed_state()
    assert saved[P2] is None
    assert saved[P1] is not None  # the pump is back, with what is known of it now
    assert saved[ENGINE] is not None
    assert "alert_engine_other" not in saved


def test_rows_that_do_not_fit_together_are_refused() -> None:
    engine, _, _ = two_pumps()
    saved = engine.state_rows()
    with pytest.raises(ValueError, match="without the alert_engine/engine row"):
        AlertEngine(RulesConfig(), {P1: saved[P1]})
    with pytest.raises(ValueError, match="holds pump P0001"):
        AlertEngine(RulesConfig(), {ENGINE: saved[ENGINE], P2: saved[P1]})


# -- the single row of earlier builds --------------------------------------------------------------


def test_the_single_row_of_an_earlier_build_loads_and_the_first_save_replaces_it(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"])
    box.append([], {STATE_KEY: SINGLE_ROW.read_bytes()})
    engine = AlertEngine(RulesConfig(), box.load_states(STATE_KEY), salt=b"another salt")
    assert engine.pumps() == ["P0001", "P0002"]
    (latched,) = engine.active_alerts("P0001")
    assert (latched.alert_id, latched.state) == (SINGLE_ROW_ALERT, AlarmState.LATCHED)

    rows = engine.changed_state()
    assert rows[STATE_KEY] is None
    assert sorted(k for k, row in rows.items() if row is not None) == [ENGINE, P1, P2]
    box.append([], rows)
    assert box.load_states(STATE_KEY).get(STATE_KEY) is None
    box.close()

    box = Outbox(tmp_path / "o.db", ["mqtt"])
    again = AlertEngine(RulesConfig(), box.load_states(STATE_KEY))
    assert canonical(again.state_rows()) == canonical(engine.state_rows())
    assert again.changed_state() == {}
    acked, end = ack(again, SINGLE_ROW_ALERT, 200)
    assert (acked.phase, end.phase) == (Phase.ACKNOWLEDGED, Phase.END)
    # The salt came along: a new alert gets the id an engine with that salt gives it.
    (new,) = starts(Feed(again, pump_id="P0002", seq=2, last_t_s=60).reading(300, 1.9),
                    "low_reservoir")  # fmt: skip
    (same,) = starts(Feed(AlertEngine(RulesConfig(), salt=SALT), pump_id="P0002").reading(
        300, 1.9), "low_reservoir")  # fmt: skip
    assert new.alert_id == same.alert_id
    box.close()


def test_a_single_row_beside_rows_is_the_newer_state_and_the_rows_it_lacks_go() -> None:
    """Rows, then an earlier build run again: its single row is what it last saw."""
    other = AlertEngine(RulesConfig())
    Feed(other, pump_id="P0009").reading(0, 10.0)
    rows = {**other.state_rows(), STATE_KEY: SINGLE_ROW.read_bytes()}
    engine = AlertEngine(RulesConfig(), rows)
    assert engine.pumps() == ["P0001", "P0002"]
    saved = engine.changed_state()
    assert saved["alert_engine/pump/P0009"] is None
    assert saved[STATE_KEY] is None
    assert saved[ENGINE] == engine.state_rows()[ENGINE] != other.state_rows()[ENGINE]


# -- the gateway's start and first save ------------------------------------------------------------


def gateway_on(tmp_path: Path, state: dict[str, bytes | None]) -> Gateway:
    """A gateway (not started) on an outbox that already holds `state`."""
    outbox = tmp_path / "outbox.db"
    config = tmp_path / "pumpgw.toml"
    config.write_text(f'[store]\npath = "{outbox}"\n[health]\nlisten = ""\n')
    box = Outbox(outbox, ["mqtt"])
    box.append([], state)
    box.close()
    return Gateway(load_settings(config))


def test_the_gateway_starts_on_an_earlier_builds_outbox_and_its_first_save_replaces_the_row(
    tmp_path: Path,
) -> None:
    gateway = gateway_on(tmp_path, {STATE_KEY: SINGLE_ROW.read_bytes()})
    try:
        (latched,) = gateway.pipeline.engine.active_alerts("P0001")
        gateway._commit(Batch(), snapshot=True)
        rows = gateway.outbox.load_states(STATE_KEY)
    finally:
        gateway.outbox.close()
    assert latched.alert_id == SINGLE_ROW_ALERT
    assert sorted(rows) == [ENGINE, P1, P2]


def test_the_gateway_deletes_an_unusable_state_at_its_first_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, _, _ = two_pumps()
    gateway = gateway_on(tmp_path, {**engine.state_rows(), P2: b"{not json"})
    try:
        assert gateway.pipeline.engine.pumps() == []
        gateway._commit(Batch(), snapshot=True)
        rows = gateway.outbox.load_states(STATE_KEY)
    finally:
        gateway.outbox.close()
    assert "saved alert state unusable" in caplog.text
    assert list(rows) == [ENGINE]
    assert rows[ENGINE] != engine.state_rows()[ENGINE]  # a new salt
