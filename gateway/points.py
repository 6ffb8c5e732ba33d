"""Point naming: validated messages to InfluxDB line protocol (docs/timeseries.md).

Pure: imports only the standard library, pydantic and `schemas`. Runs once per record at
ingest, so lines are built with string formatting, not client Point objects.

Point identity (what makes a replay overwrite itself): a point's key in InfluxDB is
measurement + tag set + timestamp. Device records carry `boot` as a tag (it changes only
when the pump restarts) and their timestamp is the device time in whole microseconds
times 1000 plus `seq % 1000` in the sub-microsecond digits, so two records of one pump
that share a device time (a clock stepping back) still get distinct keys, while the same
record always gets the same key. An alert transition caused by a device message sits at that
message's device time, on the readings' time axis, so a replay of the same frames recreates
the same points; one without a cause message (an acknowledgement, telemetry loss starting)
sits at its gateway time `at`. A hash of the alert id and the phase code fill those digits.

Every value a dashboard needs is a number: VictoriaMetrics cannot store strings (1.79
turns a string field into a series of zeros), so readings carry states as codes and only
the rare alert points add strings (ids, text) for InfluxDB.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from pydantic import BaseModel

from schemas.models import (
    AlarmState,
    AlertTransition,
    BatteryState,
    DeviceEvent,
    Inactivation,
    Phase,
    Priority,
    PumpState,
    Reading,
)

READING: Final = "pump_reading"
EVENT: Final = "pump_event"
ALERT: Final = "pump_alert"

PUMP_STATE_CODES: Final[dict[str, int]] = {
    PumpState.RUNNING: 0,
    PumpState.STOPPED: 1,
    PumpState.STALLED: 2,
}
BATTERY_STATE_CODES: Final[dict[str, int]] = {
    BatteryState.OK: 0,
    BatteryState.ERI: 1,
    BatteryState.EOS: 2,
    BatteryState.LBR: 3,
    BatteryState.SAFE_STATE: 4,
}
PRIORITY_CODES: Final[dict[str, int]] = {
    Priority.NONE: 0,
    Priority.LOW: 1,
    Priority.MEDIUM: 2,
    Priority.HIGH: 3,
}
ALARM_STATE_CODES: Final[dict[str, int]] = {
    AlarmState.INACTIVE: 0,
    AlarmState.ACTIVE: 1,
    AlarmState.LATCHED: 2,
}
PHASE_CODES: Final[dict[str, int]] = {
    Phase.START: 0,
    Phase.UPDATE: 1,
    Phase.ACKNOWLEDGED: 2,
    Phase.END: 3,
}

TIE_BREAK_MODULUS: Final = 1000
"""Sub-microsecond nanosecond digits: `seq % 1000` for device records."""
ALERT_ID_BUCKETS: Final = TIE_BREAK_MODULUS // len(PHASE_CODES)
"""Alert points: `crc32(alert_id) % 250 * 4 + phase_code` in those digits."""
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND: Final = timedelta(microseconds=1)

# Line protocol escaping (docs.influxdata.com, line protocol reference, special characters).
# Newlines cannot be escaped anywhere, so they become spaces.
_MEASUREMENT_ESCAPES: Final = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\ ", "\r": r"\ "})
_TAG_ESCAPES: Final = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\ ", "\r": r"\ "})
_STRING_ESCAPES: Final = str.maketrans({'"': r"\"", "\\": r"\\", "\n": " ", "\r": " "})


def escape_measurement(name: str) -> str:
    """Escape a measurement name (commas and spaces)."""
    return name.translate(_MEASUREMENT_ESCAPES)


def escape_tag(value: str) -> str:
    """Escape a tag key, tag value or field key (commas, equals signs, spaces)."""
    return value.translate(_TAG_ESCAPES)


def quote_string(value: str) -> str:
    """Quote a string field value, escaping double quotes and backslashes."""
    return '"' + value.translate(_STRING_ESCAPES) + '"'


def epoch_us(moment: datetime) -> int:
    """Whole microseconds since the Unix epoch of an aware datetime, in integer arithmetic."""
    delta = moment - EPOCH  # the fields of a timedelta: faster than `// ONE_MICROSECOND`
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def epoch_ns(moment: datetime) -> int:
    """Nanoseconds since the Unix epoch of an aware datetime (datetime holds microseconds)."""
    return epoch_us(moment) * 1000


def point_time_ns(device_time: datetime, seq: int) -> int:
    """A device record's timestamp: device time in microseconds, `seq % 1000` below."""
    return epoch_us(device_time) * 1000 + seq % TIE_BREAK_MODULUS


def alert_time_ns(alert: AlertTransition) -> int:
    """An alert transition's timestamp: cause device time, else `at`; alert hash, phase below."""
    # Not `at` alone: transitions of one read share it (an alert latched and present again
    # in the same batch would overwrite each other), and a replay would give them a new one.
    moment = alert.device_time or alert.at
    bucket = zlib.crc32(alert.alert_id.encode()) % ALERT_ID_BUCKETS
    return epoch_us(moment) * 1000 + bucket * len(PHASE_CODES) + PHASE_CODES[alert.phase]


@dataclass(frozen=True, slots=True)
class PointTags:
    """The station's own tags on every point, and an optional measurement name prefix."""

    site: str
    station: str
    measurement_prefix: str = ""
    tag_set: str = field(init=False, repr=False, compare=False)
    reading_measurement: str = field(init=False, repr=False, compare=False)
    event_measurement: str = field(init=False, repr=False, compare=False)
    alert_measurement: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in (("site", self.site), ("station", self.station)):
            if not value or "\\" in value or not value.isprintable():
                raise ValueError(
                    f"{name} {value!r}: a tag value must be non-empty printable text "
                    "without backslashes"
                )
        if self.measurement_prefix and not self.measurement_prefix.isprintable():
            raise ValueError(f"measurement_prefix {self.measurement_prefix!r} is not printable")
        # Precomputed once: these are the same on every point of this station.
        tag_set = f"site={escape_tag(self.site)},station={escape_tag(self.station)}"
        object.__setattr__(self, "tag_set", tag_set)
        for attribute, name in (
            ("reading_measurement", READING),
            ("event_measurement", EVENT),
            ("alert_measurement", ALERT),
        ):
            object.__setattr__(self, attribute, escape_measurement(self.measurement_prefix + name))


def line_for(message: BaseModel, tags: PointTags) -> bytes | None:
    """The line protocol point of a message, or None when it is not a time series."""
    if isinstance(message, Reading):
        return reading_line(message, tags)
    if isinstance(message, DeviceEvent):
        return event_line(message, tags)
    if isinstance(message, AlertTransition):
        return alert_line(message, tags)
    return None  # info, status, active alerts, quarantine: state and records, not series


def reading_line(reading: Reading, tags: PointTags) -> bytes:
    """A `pump_reading` point: numbers only (states as codes), the high-volume series."""
    r = reading
    alarm_priority = max((PRIORITY_CODES[a.priority] for a in r.alarms), default=0)
    battery_pct = r.battery_remaining_pct
    battery = "" if battery_pct is None else f",battery_remaining_pct={battery_pct!r}"
    line = (
        f"{tags.reading_measurement},boot={escape_tag(r.boot_id)},drug={escape_tag(r.drug)},"
        f"pump={escape_tag(r.pump_id)},{tags.tag_set} "
        f"reservoir_ml={r.reservoir_ml!r},"
        f"reservoir_capacity_ml={r.reservoir_capacity_ml!r},"
        f"low_reservoir_alarm_ml={r.low_reservoir_alarm_ml!r},"
        f"basal_rate_ml_per_day={r.basal_rate_ml_per_day!r},"
        f"delivered_total_ml={r.delivered_total_ml!r},"
        f"bolus_count_24h={r.bolus_count_24h}i{battery},"
        f"pump_state_code={PUMP_STATE_CODES[r.pump_state]}i,"
        f"battery_state_code={BATTERY_STATE_CODES[r.battery_state]}i,"
        f"alarm_count={len(r.alarms)}i,alarm_max_priority_code={alarm_priority}i,"
        f"seq={r.seq}i,received_at_ns={epoch_ns(r.received_at)}i "
        f"{point_time_ns(r.device_time, r.seq)}"
    )
    return line.encode()


def event_line(event: DeviceEvent, tags: PointTags) -> bytes:
    """A `pump_event` point; volumes only where the event carries them."""
    e = event
    volumes = "".join(
        f",{name}={value!r}"
        for name, value in (
            ("bolus_ml", e.bolus_ml),
            ("withdrawn_ml", e.withdrawn_ml),
            ("filled_ml", e.filled_ml),
        )
        if value is not None
    )
    line = (
        f"{tags.event_measurement},boot={escape_tag(e.boot_id)},event={escape_tag(e.event)},"
        f"pump={escape_tag(e.pump_id)},{tags.tag_set} "
        f"seq={e.seq}i,received_at_ns={epoch_ns(e.received_at)}i{volumes} "
        f"{point_time_ns(e.device_time, e.seq)}"
    )
    return line.encode()


def alert_line(alert: AlertTransition, tags: PointTags) -> bytes:
    """A `pump_alert` point: one alert transition."""
    a = alert
    phase_code = PHASE_CODES[a.phase]
    acknowledged = int(a.inactivation is Inactivation.ACKNOWLEDGED)
    optional = "".join(
        f",{name}={value!r}"
        for name, value in (("value", a.value), ("threshold", a.threshold))
        if value is not None
    )
    if a.unit is not None:
        optional += f",unit={quote_string(a.unit)}"
    line = (
        f"{tags.alert_measurement},alert_kind={escape_tag(a.alert_kind)},"
        f"priority={escape_tag(a.priority)},pump={escape_tag(a.pump_id)},{tags.tag_set} "
        f"state_code={ALARM_STATE_CODES[a.state]}i,state={quote_string(a.state)},"
        f"phase_code={phase_code}i,phase={quote_string(a.phase)},"
        f"priority_code={PRIORITY_CODES[a.priority]}i,"
        f"acknowledged={acknowledged}i,latching={int(a.latching)}i{optional},"
        f"alert_type={quote_string(a.alert_type)},alert_id={quote_string(a.alert_id)},"
        f"transition_id={quote_string(a.transition_id)},text={quote_string(a.text)} "
        f"{alert_time_ns(a)}"
    )
    return line.encode()
