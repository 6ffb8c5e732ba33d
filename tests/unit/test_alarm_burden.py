"""The alarm-burden benchmark at small size: every target of issue 10 met, every figure there.

The full suite is `python -m bench --only=alarms`; this runs its quick cases (an 8-pump ward over
20 days with clinic refills, each fault scenario for one day) and checks the verdicts it gives.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.bench_alarms import FAULT_SCENARIOS, measure


@pytest.fixture(scope="module")
def burden() -> dict[str, Any]:
    return measure(quick=True)


def test_every_quick_case_meets_its_targets(burden: dict[str, Any]) -> None:
    missed = {k: c["verdict"]["reasons"] for k, c in burden["cases"].items()
              if c["verdict"]["verdict"] != "met"}  # fmt: skip
    assert missed == {}
    assert burden["summary"]["met_share"] == 1.0


def test_the_ward_is_refilled_and_quiet(burden: dict[str, Any]) -> None:
    ward = burden["cases"]["ward"]
    assert ward["clinic_refills"] > 0
    assert ward["starts_by_priority"]["PH"] + ward["starts_by_priority"]["PM"] == 0
    assert set(ward["starts_by_kind"]) <= {"refill_due"}


def test_every_fault_scenario_raises_its_class_in_time(burden: dict[str, Any]) -> None:
    for name in FAULT_SCENARIOS:
        case = burden["cases"][f"{name} 1d"]
        assert case["missed"] == {}, name
        assert case["late_min"] == {}, name
        assert case["false_by_priority"]["PH"] + case["false_by_priority"]["PM"] == 0, name


def test_figures_per_priority_per_pump_day_are_reported(burden: dict[str, Any]) -> None:
    case = burden["cases"]["rate-fallback 1d"]
    assert case["starts_per_pump_day"]["PH"] == pytest.approx(1.0)  # the rate drop
    assert case["time_to_alert_min"]["rate_drop"]["max"] <= 5.0
