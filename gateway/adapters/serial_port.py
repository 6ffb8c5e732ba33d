"""Serial sources: read bytes from a line with pyserial, decode frames, reconnect with backoff.

`serial.serial_for_url` makes device paths, ptys, `socket://host:port` and
`rfc2217://host:port` look alike. Reads use a short timeout so a clean shutdown
never waits on the line. pyserial's exceptions are mapped to SourceError here.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Literal

import serial
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import PumpgwError
from schemas.codec import Frame, FrameDecoder, FrameError
from schemas.models import SourceStatus

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.2
READ_CHUNK_BYTES = 65536
FLOOD_READ_CHUNK_BYTES = 16384
"""A line in a flood reads less at a time: shorter turns, so the other lines wait less."""
RECONNECT_MIN_BACKOFF_S = 0.5
RECONNECT_MAX_BACKOFF_S = 30.0
FLOOD_MIN_PAUSE_S = 0.001
"""A line in a flood pauses after each read at least this long, and as long as decoding took:
it gets at most half of the gateway's time, and the healthy lines keep theirs."""


class SourceSettings(BaseModel):
    """One `[[sources]]` entry: a serial line or a URL pyserial understands."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        min_length=1, description="/dev/ttyUSB0, a pty path, socket://h:p, rfc2217://h:p"
    )
    name: str | None = Field(None, description="label in logs and metrics (default: the url)")
    baudrate: int = Field(115200, gt=0, le=4_000_000)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = Field(1, description="1, 1.5 or 2")
    rtscts: bool = False

    @property
    def label(self) -> str:
        return self.name or self.url


class SourceError(PumpgwError):
    """The line cannot be opened or read; carries the source label."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


Deliver = Callable[["SerialSource", float, list[Frame | FrameError]], bool]
"""Hands decoded items to the service; returns False to say stop reading (shutdown)."""


def _open(settings: SourceSettings) -> serial.SerialBase:
    try:
        return serial.serial_for_url(
            settings.url,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            rtscts=settings.rtscts,
            timeout=READ_TIMEOUT_S,
            write_timeout=1.0,
        )
    except (serial.SerialException, OSError, ValueError) as exc:
        raise SourceError(settings.label, f"cannot open: {exc}") from exc


def _read(port: serial.SerialBase, label: str, chunk_bytes: int = READ_CHUNK_BYTES) -> bytes:
    """Wait up to READ_TIMEOUT_S for a byte, then take whatever else is already there."""
    try:
        first = port.read(1)
        if not first:
            return b""
        # in_waiting is only 0 or 1 on socket://, so read without waiting instead.
        port.timeout = 0
        try:
            return first + port.read(chunk_bytes - 1)
        finally:
            port.timeout = READ_TIMEOUT_S
    except (serial.SerialException, OSError, TypeError) as exc:
        # TypeError: pyserial's posix read on a closed fd raises it during unplug.
        # pyserial's own text often starts "read failed: " already.
        raise SourceError(label, f"read failed: {str(exc).removeprefix('read failed: ')}") from exc


class SerialSource:
    """Reads one line until stopped, reconnecting with capped exponential backoff."""

    def __init__(self, settings: SourceSettings, deliver: Deliver) -> None:
        self.settings = settings
        self.label = settings.label
        self._deliver = deliver
        self._port: serial.SerialBase | None = None
        self._write_lock = threading.Lock()
        self.connected = False
        self.reconnects = 0
        self.bytes_in = 0
        self.last_error: str | None = None

    def status(self) -> SourceStatus:
        return SourceStatus(
            url=self.label,
            connected=self.connected,
            reconnects=self.reconnects,
            last_error=self.last_error,
        )

    def run(self, stop: threading.Event) -> None:
        """Open, read and decode until `stop` is set."""
        backoff_s = RECONNECT_MIN_BACKOFF_S
        while not stop.is_set():
            try:
                self._port = _open(self.settings)
                self._on_connected()
                backoff_s = RECONNECT_MIN_BACKOFF_S
                self._read_until_error(self._port, stop)
            except SourceError as exc:
                self._on_lost(str(exc))
            finally:
                self._close()
            if not stop.is_set():
                stop.wait(backoff_s * random.uniform(0.8, 1.2))
                backoff_s = min(backoff_s * 2, RECONNECT_MAX_BACKOFF_S)

    def _read_until_error(self, port: serial.SerialBase, stop: threading.Event) -> None:
        decoder = FrameDecoder()
        try:
            while not stop.is_set():
                chunk_bytes = FLOOD_READ_CHUNK_BYTES if decoder.flooded else READ_CHUNK_BYTES
                data = _read(port, self.label, chunk_bytes)
                if not data:  # the line is quiet: report a flood coalesced so far
                    quiet = decoder.idle()
                    if quiet and not self._deliver(self, time.time(), list(quiet)):
                        return
                    continue
                received_at = time.time()
                started_m = time.monotonic()
                self.bytes_in += len(data)
                items = decoder.feed(data)
                if items and not self._deliver(self, received_at, items):
                    return
                if decoder.flooded:  # bounded: the rest waits in the line (TCP, UART)
                    stop.wait(max(FLOOD_MIN_PAUSE_S, time.monotonic() - started_m))
        finally:
            # Also when the line drops: a frame cut off there is quarantined, not forgotten.
            leftover = decoder.flush()
            if leftover:
                self._deliver(self, time.time(), list(leftover))

    def send(self, data: bytes) -> None:
        """Write to the line (acknowledgements); a failure is logged, the reader reconnects."""
        with self._write_lock:
            port = self._port
            if port is None or not self.connected:
                return
            try:
                port.write(data)
            except (serial.SerialException, OSError) as exc:
                log.debug("%s: ack write failed: %s", self.label, exc)

    def _on_connected(self) -> None:
        if self.last_error is not None:
            self.reconnects += 1
            log.warning("%s: line connected again", self.label)
        else:
            log.info("%s: line connected", self.label)
        self.connected = True
        self.last_error = None

    def _on_lost(self, reason: str) -> None:
        if self.connected or self.last_error is None:
            log.warning("%s; reconnecting with backoff", reason)
        else:
            log.debug("%s; still reconnecting", reason)
        self.connected = False
        self.last_error = reason

    def _close(self) -> None:
        with self._write_lock:
            port, self._port = self._port, None
            self.connected = False
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as exc:
                log.debug("%s: close failed: %s", self.label, exc)
