"""What a central worker admits from the broker: origin, names, times and cardinality.

Pure: no I/O, no clock (the window is built from a `now` the caller passes). The ingest
worker asks these before it stores anything a publisher sent:

- `OriginGuard.admit_station`: the site and station a topic names are allowed (glob patterns,
  a maximum length) and the worker tracks no more than `max_stations` of them;
- `TimeWindow.problem`: every time in the message lies within a window around the worker's
  clock (older data is a replay from a station's outbox, which is fine up to `max_age`);
- `OriginGuard.admit_pump`: a station reports no more than `max_pumps_per_station` pumps.

Every refusal names what was refused and the limit, so the quarantine says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase

from schemas.models import MAX_DEVICE_CLOCK_AHEAD, AlertTransition, DeviceMessage

NO_SLACK = timedelta(0)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message is not admitted: a quarantine reason kind and a readable reason."""

    reason_kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """The times a worker accepts: [earliest, latest] on its own clock."""

    earliest: datetime
    latest: datetime

    @classmethod
    def around(cls, now: datetime, max_age: timedelta, max_ahead: timedelta) -> TimeWindow:
        return cls(now - max_age, now + max_ahead)

    def problem(self, message: DeviceMessage | AlertTransition) -> Refusal | None:
        """The first time of `message` outside the window, or None."""
        for name, value, slack in _times(message):
            if value is None:
                continue
            if value < self.earliest:
                return Refusal(
                    "time_window",
                    f"{name} {value.isoformat()} is before {self.earliest.isoformat()} "
                    "(ingest.max_record_age_days before this worker's clock)",
                )
            if value > self.latest + slack:
                return Refusal(
                    "time_window",
                    f"{name} {value.isoformat()} is after {(self.latest + slack).isoformat()} "
                    "(ingest.max_clock_ahead_s after this worker's clock)",
                )
        return None


def _times(
    message: DeviceMessage | AlertTransition,
) -> list[tuple[str, datetime | None, timedelta]]:
    """(field, time, extra slack ahead): a pump's own clock may run ahead of the station's."""
    if isinstance(message, AlertTransition):
        return [
            ("at", message.at, NO_SLACK),
            ("device_time", message.device_time, MAX_DEVICE_CLOCK_AHEAD),
            ("acknowledged_at", message.acknowledged_at, NO_SLACK),
        ]
    return [
        ("received_at", message.received_at, NO_SLACK),
        ("device_time", message.device_time, MAX_DEVICE_CLOCK_AHEAD),
    ]


@dataclass(frozen=True, slots=True)
class OriginLimits:
    """Which stations a worker takes, and how many names of each kind it keeps."""

    sites: tuple[str, ...] = ("*",)
    stations: tuple[str, ...] = ("*",)
    max_name_chars: int = 64
    max_stations: int = 10_000
    max_pumps_per_station: int = 256


@dataclass
class OriginGuard:
    """Admits sites, stations and pumps within `limits`; remembers what it admitted."""

    limits: OriginLimits
    _pumps: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    refused: int = 0

    def admit_station(self, site: str, station: str) -> Refusal | None:
        """None if messages of this site and station may be stored."""
        refusal = self._station_refusal(site, station)
        if refusal is not None:
            self.refused += 1
        return refusal

    def _station_refusal(self, site: str, station: str) -> Refusal | None:
        if (site, station) in self._pumps:
            return None  # admitted before (admit_pump records it): the limits do not change
        limits = self.limits
        for kind, name, patterns in (
            ("site", site, limits.sites),
            ("station", station, limits.stations),
        ):
            if len(name) > limits.max_name_chars:
                return Refusal(
                    "name_too_long",
                    f"{kind} name of {len(name)} characters (ingest.max_name_chars "
                    f"{limits.max_name_chars}): {name[:40]!r}...",
                )
            if not any(fnmatchcase(name, pattern) for pattern in patterns):
                return Refusal(
                    "not_allowed",
                    f"{kind} {name!r} matches none of ingest.{kind}s {list(patterns)}",
                )
        if (site, station) not in self._pumps and len(self._pumps) >= limits.max_stations:
            return Refusal(
                "too_many_stations",
                f"{site}/{station} would be station {len(self._pumps) + 1} "
                f"(ingest.max_stations {limits.max_stations})",
            )
        return None

    def admit_pump(self, site: str, station: str, pump_id: str) -> Refusal | None:
        """None if this pump's messages may be stored; the first admission makes it known."""
        pumps = self._pumps.setdefault((site, station), set())
        if pump_id in pumps:
            return None
        if len(pumps) >= self.limits.max_pumps_per_station:
            self.refused += 1
            return Refusal(
                "too_many_pumps",
                f"pump {pump_id!r} would be pump {len(pumps) + 1} of {site}/{station} "
                f"(ingest.max_pumps_per_station {self.limits.max_pumps_per_station})",
            )
        pumps.add(pump_id)
        return None

    @property
    def stations(self) -> int:
        return len(self._pumps)
