"""Alert rule settings: the `[alerts]` configuration section, pure pydantic models.

docs/alerts.md explains each setting, its default and its source in DOMAIN.md.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field

from schemas.models import Drug

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


class RulesConfig(BaseModel):
    """The `[alerts]` section: defaults, then per-drug, then per-pump overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    defaults: RuleSettings = RuleSettings()
    per_drug: dict[Drug, RuleOverrides] = Field(default_factory=dict)
    per_pump: dict[str, RuleOverrides] = Field(default_factory=dict)

    def settings_for(self, pump_id: str, drug: Drug | None) -> RuleSettings:
        """Effective settings of one pump: pump over drug over defaults."""
        merged: dict[str, object] = {}
        by_drug = self.per_drug.get(drug) if drug is not None else None
        for overrides in (by_drug, self.per_pump.get(pump_id)):
            if overrides is not None:
                merged.update(overrides.model_dump(exclude_none=True))
        if not merged:
            return self.defaults
        return RuleSettings.model_validate({**self.defaults.model_dump(), **merged})
