"""Alert rule settings: the `[alerts]` configuration section, pure pydantic models.

docs/alerts.md explains each setting, its default and its source in DOMAIN.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field

from schemas.models import PUMP_ID_PATTERN, Drug

SECONDS_PER_DAY: Final = 86_400.0

VolumeMl = Annotated[float, Field(ge=0.0, le=100.0)]
Percent = Annotated[float, Field(gt=0.0, le=100.0)]
DurationS = Annotated[float, Field(ge=0.0, le=30 * SECONDS_PER_DAY)]
WindowH = Annotated[float, Field(gt=0.0, le=30 * 24.0)]
Days = Annotated[float, Field(ge=0.0, le=365.0)]


class RuleSettings(BaseModel):
    """Thresholds of every rule for one pump; defaults and sources in docs/alerts.md."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    low_reservoir_alarm_ml: VolumeMl | None = Field(
        None,
        description="Low-reservoir volume; None uses the pump's programmed alarm volume "
        "(manufacturer default 2 mL, DOMAIN 2.1 [S13]).",
    )
    low_reservoir_clear_margin_ml: VolumeMl = Field(
        1.0,
        description="[D] Hysteresis for low and empty reservoir: clears only above "
        "threshold + margin (a refill); 1 mL is the smallest consequential volume "
        "error (DOMAIN 2.4 [S12]).",
    )
    low_reservoir_for_s: DurationS = Field(
        0.0, description="Low reservoir must hold this long (device time) before it starts."
    )
    empty_reservoir_ml: VolumeMl = Field(
        1.0,
        description="[D] Empty at or below this estimate; the calculated 'empty' of the "
        "implanted MiniMed analogue is <= 1 mL (DOMAIN 2.1 [S55]).",
    )
    empty_reservoir_for_s: DurationS = Field(
        0.0, description="Empty reservoir must hold this long before it starts."
    )
    refill_due_days: Days = Field(
        7.0,
        description="[D] Advisory when the projected days to the alarm volume are at or "
        "below this; withdrawal began 1-7 days before the 2 mL alarm (DOMAIN 2.1 [S13]).",
    )
    refill_due_clear_margin_days: Days = Field(
        1.0, description="[D] Refill due clears only above refill_due_days + this."
    )
    flow_window_h: WindowH = Field(
        24.0,
        description="[D] Window over which delivered volume is compared with the programmed "
        "volume (rates are per day, DOMAIN 1.4).",
    )
    flow_min_window_h: WindowH = Field(
        12.0,
        description="[D] First flow verdict once this much of the window has readings: a "
        "+25 % fault from the first reading then shows within 13 h, not 25 h.",
    )
    flow_min_expected_ml: VolumeMl = Field(
        0.04,
        description="[D] No flow verdict unless the window expects at least this volume; "
        "just below one day at the 0.048 mL/day minimum rate (DOMAIN 1.1 [S16]).",
    )
    over_infusion_pct: Percent = Field(
        14.5,
        description="Over-infusion: delivered exceeds programmed by more than this "
        "(DOMAIN 3 [S22]).",
    )
    under_infusion_pct: Percent = Field(
        14.5,
        description="Under-infusion: delivered below programmed by more than this "
        "(labeling accuracy +/-14.5 %, DOMAIN 3 [S22],[S23]).",
    )
    flow_clear_margin_pct: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        5.0,
        description="[D] Flow alerts clear only within tolerance minus this; observed "
        "per-refill errors are about 2.5 % (DOMAIN 3 [S11]).",
    )
    over_infusion_for_s: DurationS = Field(
        3_600.0, description="[D] Over-infusion must be sustained this long before it starts."
    )
    under_infusion_for_s: DurationS = Field(
        3_600.0, description="[D] Under-infusion must be sustained this long before it starts."
    )
    stall_window_h: WindowH = Field(
        6.0,
        description="[D] Motor stall inferred when the delivered total has not increased "
        "for this long while the pump runs with a basal rate.",
    )
    pump_stopped_for_s: DurationS = Field(
        600.0,
        description="[D] Pump stopped with therapy programmed for this long; a programming "
        "session stops the pump briefly (DOMAIN 1.1 [S28]).",
    )
    battery_for_s: DurationS = Field(
        0.0, description="Battery and safe-state reports must hold this long before they start."
    )
    refill_discrepancy_pct: Percent = Field(
        14.5,
        description="Refill tolerance as a share of the volume delivered since the last "
        "fill (DOMAIN 3 [S22]).",
    )
    refill_discrepancy_small_ml: VolumeMl = Field(
        1.0, description="Minimum refill tolerance of a small (<= 20 mL) pump (DOMAIN 2.4 [S12])."
    )
    refill_discrepancy_large_ml: VolumeMl = Field(
        2.0, description="Minimum refill tolerance of a larger pump (40 mL, DOMAIN 2.4 [S12])."
    )
    small_reservoir_max_ml: VolumeMl = Field(
        20.0, description="Reservoirs up to this capacity use the small-pump tolerance."
    )
    telemetry_lost_after_s: Annotated[float, Field(gt=0.0, le=30 * SECONDS_PER_DAY)] = Field(
        300.0,
        description="[D] Telemetry lost when no message arrived for this long (gateway "
        "clock); five times the once-a-minute PCD-01 interval (DOMAIN 4.3 [S70]).",
    )
    device_alarm_for_s: DurationS = Field(
        0.0, description="A pump-reported alarm must persist this long before it starts."
    )
    reannounce_after_s: DurationS = Field(
        900.0,
        description="[D] An unacknowledged PH or PM alert is announced again, one escalation "
        "level higher, after this long and every this long (gateway clock); 0 turns it off. "
        "IEC 60601-1-8 escalation timing is not available (DOMAIN 4.1).",
    )
    telemetry_lost_escalate_after_s: DurationS = Field(
        3_600.0,
        description="[D] Telemetry lost escalates from PL to PM after this much silence; "
        "during the gap the reservoir is projected from the programmed rate.",
    )
    clock_step_limit_s: Annotated[float, Field(gt=0.0, le=30 * SECONDS_PER_DAY)] = Field(
        7_200.0,
        description="[D] A device clock step beyond this is corrected out of every window "
        "and raised as clock_step; a smaller one shifts a 24 h flow window by under 8.3 %, "
        "inside the 14.5 % limit (DOMAIN 3 [S22]).",
    )
    refill_duplicate_within_s: DurationS = Field(
        SECONDS_PER_DAY,
        description="[D] A refill record repeating the last one's withdrawn and filled "
        "volumes within this time is the same refill logged twice.",
    )
    rate_drop_pct: Percent = Field(
        50.0,
        description="[D] A programmed basal rate falling by more than this between two "
        "readings, without a programming session, raises rate_drop; after a low battery "
        "reset some pumps fall back to a very low rate (DOMAIN 2.2 [S1],[S26]).",
    )
    programming_session_s: DurationS = Field(
        3_600.0,
        description="[D] A rate change within this time after the pump restarted from "
        "stopped counts as programmed (a session stops the pump, DOMAIN 1.1 [S28]).",
    )
    reset_recent_s: DurationS = Field(
        SECONDS_PER_DAY,
        description="[D] A rate drop within this time after a low battery reset or in "
        "safe state is high priority (DOMAIN 2.2 [S27]).",
    )
    withdrawal_risk: bool = Field(
        False,
        description="Abrupt stop of this drug is dangerous: under-infusion, rate drop and "
        "long telemetry loss are high priority (baclofen, DOMAIN 1.4 [S52],[S95]).",
    )
    delivered_count: bool = Field(
        True,
        description="The pump reports a motor-derived delivered_total_ml: the flow and "
        "inferred-stall rules use it. False (per model): only the refill comparison runs.",
    )


class RuleOverrides(BaseModel):
    """Per-drug or per-pump overrides: every RuleSettings field, None inherits."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    low_reservoir_alarm_ml: VolumeMl | None = None
    low_reservoir_clear_margin_ml: VolumeMl | None = None
    low_reservoir_for_s: DurationS | None = None
    empty_reservoir_ml: VolumeMl | None = None
    empty_reservoir_for_s: DurationS | None = None
    refill_due_days: Days | None = None
    refill_due_clear_margin_days: Days | None = None
    flow_window_h: WindowH | None = None
    flow_min_window_h: WindowH | None = None
    flow_min_expected_ml: VolumeMl | None = None
    over_infusion_pct: Percent | None = None
    under_infusion_pct: Percent | None = None
    flow_clear_margin_pct: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    over_infusion_for_s: DurationS | None = None
    under_infusion_for_s: DurationS | None = None
    stall_window_h: WindowH | None = None
    pump_stopped_for_s: DurationS | None = None
    battery_for_s: DurationS | None = None
    refill_discrepancy_pct: Percent | None = None
    refill_discrepancy_small_ml: VolumeMl | None = None
    refill_discrepancy_large_ml: VolumeMl | None = None
    small_reservoir_max_ml: VolumeMl | None = None
    telemetry_lost_after_s: Annotated[float, Field(gt=0.0, le=30 * SECONDS_PER_DAY)] | None = None
    device_alarm_for_s: DurationS | None = None
    reannounce_after_s: DurationS | None = None
    telemetry_lost_escalate_after_s: DurationS | None = None
    clock_step_limit_s: Annotated[float, Field(gt=0.0, le=30 * SECONDS_PER_DAY)] | None = None
    refill_duplicate_within_s: DurationS | None = None
    rate_drop_pct: Percent | None = None
    programming_session_s: DurationS | None = None
    reset_recent_s: DurationS | None = None
    withdrawal_risk: bool | None = None
    delivered_count: bool | None = None


DRUG_PROFILES: Final[Mapping[Drug, RuleOverrides]] = {
    # 24 % of patients had withdrawal before the 2 mL alarm; none once raised to 4 mL [S13];
    # abrupt baclofen withdrawal can be fatal [S52],[S95].
    Drug.BACLOFEN: RuleOverrides(low_reservoir_alarm_ml=4.0, withdrawal_risk=True),
}
"""Shipped per-drug profiles (DOMAIN 1.4, 2.1); `[alerts.per_drug]` fields override them.
Ziconotide has no recognised withdrawal syndrome [S53]; the others have no sourced profile."""
_PSEUDONYM_PATTERN: Final = re.compile(r"p[0-9a-f]{16}")


class RulesConfig(BaseModel):
    """The `[alerts]` section: defaults, then per-drug, then per-pump overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    defaults: RuleSettings = RuleSettings()
    per_drug: dict[Drug, RuleOverrides] = Field(default_factory=dict)
    per_model: dict[str, RuleOverrides] = Field(default_factory=dict)
    per_pump: dict[str, RuleOverrides] = Field(default_factory=dict)
    drug_profiles: bool = Field(
        True, description="Apply the shipped per-drug profiles under per_drug (docs/alerts.md)."
    )

    def settings_for(
        self, pump_id: str, drug: Drug | None, model: str | None = None
    ) -> RuleSettings:
        """Effective settings: pump over model over drug over shipped profile over defaults."""
        merged: dict[str, object] = {}
        layers = (
            DRUG_PROFILES.get(drug) if drug is not None and self.drug_profiles else None,
            self.per_drug.get(drug) if drug is not None else None,
            self.per_model.get(model) if model is not None else None,
            self.per_pump.get(pump_id),
        )
        for overrides in layers:
            if overrides is not None:
                merged.update(overrides.model_dump(exclude_none=True))
        if not merged:
            return self.defaults
        return RuleSettings.model_validate({**self.defaults.model_dump(), **merged})

    def with_pump_ids(self, station_id: Callable[[str], str]) -> RulesConfig:
        """This configuration with each per-pump key replaced by the id the engine sees.

        With pseudonymisation on, the engine sees keyed hashes; operators write real ids.
        """
        per_pump = {station_id(key): overrides for key, overrides in self.per_pump.items()}
        return self.model_copy(update={"per_pump": per_pump})

    def override_warnings(self, pseudonymising: bool) -> list[str]:
        """One line per per-pump key that can never match a pump (for check-config)."""
        warnings = []
        for key in self.per_pump:
            if not re.fullmatch(PUMP_ID_PATTERN, key):
                warnings.append(
                    f"alerts.per_pump.{key!r}: not a valid pump id ({PUMP_ID_PATTERN}); "
                    "it can never match"
                )
            elif pseudonymising and _PSEUDONYM_PATTERN.fullmatch(key):
                warnings.append(
                    f"alerts.per_pump.{key!r}: looks like a pseudonym; write the pump's real "
                    "id, the gateway matches it before hashing"
                )
        return warnings
