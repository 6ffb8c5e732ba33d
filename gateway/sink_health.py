"""What every sink reports about itself: one frozen record, read at one moment.

The MQTT sink (adapters/mqtt.py), the InfluxDB sink (adapters/influx.py) and the HL7/FHIR
message sinks (adapters/delivery.py) return it from `Sink.health()`; gateway.store_shell turns
it into the SinkObservation that /healthz, /metrics and the terminal view render. Names in
`counters` and `gauges` become metric names (docs/operations.md), so they are part of the
contract: `pumpgw_sink_<name>_total` for a counter, `pumpgw_sink_<name>` for a gauge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SinkHealth:
    """A sink's state: reachability, the error to show, and its counts."""

    connected: bool
    last_error: str | None
    """Why the sink is not delivering (None when it is), as the operator should read it."""
    delivered: int
    """Records the receiver acknowledged (PUBACK, HTTP 2xx, AA/CA)."""
    counters: Mapping[str, int] = field(default_factory=dict)
    """Counts that only grow, per sink kind (MQTT `denied`, InfluxDB `batches`, ...)."""
    gauges: Mapping[str, int] = field(default_factory=dict)
    """Current values (MQTT `inflight`: records awaiting their PUBACK; InfluxDB `sent_up_to`)."""

    @property
    def inflight(self) -> int:
        """Records sent and not yet acknowledged (0 for a sink that sends one at a time)."""
        return self.gauges.get("inflight", 0)
