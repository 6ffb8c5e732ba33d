"""The baseline: the gateway's job done the plainest way, with each library's defaults.

Reads the line with pyserial, decodes and validates each frame with the same codec and
models, then per reading: paho `publish(qos=1)` without waiting for anything, and one
influxdb-client write per point (SYNCHRONOUS, as in the client's README; or `--influx-write
batching`, the client's default write_api()). No outbox, no acknowledgements to the pumps,
no duplicate detection, no alerts. bench/bench_gateway.py runs it against the same load as
the gateway and compares.

Run: .venv/bin/python -m bench.baseline_plain --source socket://127.0.0.1:7001 --mqtt-port P
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
import serial
from paho.mqtt.enums import CallbackAPIVersion

from schemas.codec import Frame, FrameDecoder, MessageError, message_from_frame
from schemas.models import Reading

READ_BYTES = 4096
READ_TIMEOUT_S = 0.05


def influx_writer(url: str, mode: str) -> Any:
    """A function writing one Reading as one point, or None without a database."""
    from influxdb_client.client.influxdb_client import InfluxDBClient
    from influxdb_client.client.write.point import Point
    from influxdb_client.client.write_api import SYNCHRONOUS

    client = InfluxDBClient(url=url, token="", org="bench")
    options = {"write_options": SYNCHRONOUS} if mode == "sync" else {}
    write_api = client.write_api(**options)

    def write(reading: Reading) -> None:
        point = (
            Point("pump_reading")  # type: ignore[no-untyped-call]
            .tag("pump", reading.pump_id)
            .tag("boot", reading.boot_id)
            .field("seq", reading.seq)
            .field("reservoir_ml", reading.reservoir_ml)
            .field("delivered_total_ml", reading.delivered_total_ml)
            .field("basal_rate_ml_per_day", reading.basal_rate_ml_per_day)
            .time(reading.device_time)
        )
        write_api.write(bucket="pumps", record=point)

    return write


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="socket://host:port")
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--influx-url", help="write points here (VictoriaMetrics, v2 API)")
    parser.add_argument("--influx-write", choices=["sync", "batching"], default="sync")
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", args.mqtt_port)
    client.loop_start()
    write = influx_writer(args.influx_url, args.influx_write) if args.influx_url else None
    port = serial.serial_for_url(args.source, timeout=READ_TIMEOUT_S)
    decoder = FrameDecoder()
    try:
        while not stop.is_set():
            for item in decoder.feed(port.read(READ_BYTES)):
                if isinstance(item, Frame):
                    forward(item, client, write, args.prefix)
    except serial.SerialException:
        stop.wait()  # the simulator hung up: paho keeps sending what it queued until stopped
    client.loop_stop()
    return 0


def forward(frame: Frame, client: mqtt.Client, write: Any, prefix: str) -> None:
    """Validate one frame; publish a reading and write its point."""
    try:
        message = message_from_frame(frame, datetime.now(UTC))
    except MessageError:
        return
    if isinstance(message, Reading):
        topic = f"{prefix}/test/bed-1/pumps/{message.pump_id}/telemetry"
        client.publish(topic, message.model_dump_json(), qos=1)
        if write is not None:
            write(message)


if __name__ == "__main__":
    sys.exit(main())
