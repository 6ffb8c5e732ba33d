"""The simulator's run loop: a simulated clock drives the fleet onto one link.

sim_time = start + wall time spent with a reader connected x speed. While no reader
is connected the clock pauses, so no frames are generated into the void; when one
(re)connects, the frames it has not acknowledged are sent again first, in order.
With `present` given, the simulated clock never passes it: a fast unbounded run
catches up with the present and then goes on in real time, so device times stay
valid for the gateway (which rejects times more than a day ahead).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.codec import TYPE_ACK, Frame, FrameDecoder, ack_range
from simulator.line import Line, PumpLine
from simulator.link import POLL_S, Link, PeerLostError
from simulator.model import Pump

RESEND_UNACKED_AFTER_S = 3.0
"""At the end of a run, frames still unacknowledged after this long are sent again."""

log = logging.getLogger(__name__)

FRAMES_PER_BATCH_AT_MAX: int = 1000
"""At --speed max, each write carries about this many frames."""
MAX_FRAMES_PER_TICK: int = 20_000
"""A finite speed that falls behind catches up in writes of at most this many frames."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    interval_s: float
    speed: float | None
    """Simulated seconds per wall second; None: as fast as the link takes the frames."""
    count: int | None = None
    duration_s: float | None = None
    wait_for_ack: bool = False
    ack_timeout_s: float = 30.0
    present: Callable[[], datetime] | None = None
    """The real time now; when set, simulated time is capped at it."""


class SimClock:
    """Simulated time that advances only while running (a reader is connected)."""

    def __init__(self, start: datetime, speed: float, wall: Callable[[], float] = time.monotonic):
        self._start = start
        self._speed = speed
        self._wall = wall
        self._run_s = 0.0
        self._since: float | None = None

    def now(self) -> datetime:
        running_s = self._run_s + (self._wall() - self._since if self._since is not None else 0.0)
        return self._start + timedelta(seconds=running_s * self._speed)

    def resume(self) -> None:
        if self._since is None:
            self._since = self._wall()

    def pause(self) -> None:
        if self._since is not None:
            self._run_s += self._wall() - self._since
            self._since = None


@dataclass(slots=True)
class RunResult:
    sim_start: datetime
    sim_end: datetime
    wall_s: float
    frames: int
    waiting_s: float
    """Wall time spent waiting for a reader (the clock was paused)."""
    stopped_by: str
    all_acked: bool | None
    """None when nobody can acknowledge over the link (a capture file)."""


class Runner:
    """Steps every pump at its reading times and writes each tick's frames in one batch."""

    def __init__(
        self,
        fleet: Sequence[tuple[Pump, PumpLine]],
        line: Line,
        link: Link,
        options: RunOptions,
        start: datetime,
        stop: threading.Event,
    ) -> None:
        self._pumps = [pump for pump, _ in fleet]
        self._line = line
        self._link = link
        self._opt = options
        self._stop = stop
        self._interval = timedelta(seconds=options.interval_s)
        n = len(self._pumps)
        self._due = [start + self._interval * i / n for i in range(n)]
        self._steps = [0] * n
        self._start = start
        self._clock = SimClock(start, options.speed or 1.0)
        self._decoder = FrameDecoder()
        self._frames = 0
        self._waiting_s = 0.0
        self._at_present = False
        self._t0 = time.monotonic()

    def run(self) -> RunResult:
        """Generate until --count, --duration or a signal; then optionally wait for acks."""
        self._t0 = time.monotonic()
        while (why := self._finished()) is None:
            if not self._link.connected and not self._reconnect():
                continue
            self._tick()
            self._read_acks(self._idle_s())
        self._send(self._line.take(final=True))
        all_acked: bool | None = None
        if self._link.acks:
            all_acked = self._await_acks() if self._opt.wait_for_ack else self._line.unacked == 0
        elif self._opt.wait_for_ack:
            log.warning("--wait-for-ack ignored: nobody can acknowledge over this transport")
        sim_end = max(self._due) - self._interval if self._frames else self._start
        return RunResult(
            self._start,
            sim_end,
            time.monotonic() - self._t0,
            self._frames,
            self._waiting_s,
            why,
            all_acked,
        )

    def _finished(self) -> str | None:
        if self._stop.is_set():
            return "signal"
        if self._opt.count is not None and min(self._steps) >= self._opt.count:
            return "count"
        if self._opt.duration_s is not None and time.monotonic() - self._t0 >= self._opt.duration_s:
            return "duration"
        return None

    def _reconnect(self) -> bool:
        self._clock.pause()
        began = time.monotonic()
        connected = self._link.connect(POLL_S)
        self._waiting_s += time.monotonic() - began
        if not connected:
            return False
        self._decoder = FrameDecoder()
        resent = self._line.queue_retransmit()
        log.info("reader connected; re-sending %d unacknowledged frames", resent)
        self._clock.resume()
        return True

    def _tick(self) -> None:
        target, _ = self._target()
        frames = 0
        for i, pump in enumerate(self._pumps):
            while self._due[i] <= target and self._more(i) and frames < MAX_FRAMES_PER_TICK:
                frames += self._line.add(pump.spec.pump_id, pump.step(self._due[i]))
                self._due[i] += self._interval
                self._steps[i] += 1
        self._frames += frames
        self._send(self._line.take())

    def _target(self) -> tuple[datetime, float]:
        """Generate up to this simulated time, which advances at this many s per wall s."""
        if self._opt.speed is None:
            intervals = math.ceil(FRAMES_PER_BATCH_AT_MAX / len(self._pumps))
            target = min(self._due) + self._interval * intervals - timedelta(microseconds=1)
            rate = math.inf
        else:
            target, rate = self._clock.now(), self._opt.speed
        if self._opt.present is not None:
            present = self._opt.present()
            if present < target:
                if not self._at_present:
                    log.info("simulated time reached the present; going on in real time")
                    self._at_present = True
                return present, 1.0
        return target, rate

    def _more(self, i: int) -> bool:
        return self._opt.count is None or self._steps[i] < self._opt.count

    def _idle_s(self) -> float:
        """How long to wait for acks before the next reading falls due."""
        if not self._link.connected:
            return 0.0
        target, rate = self._target()
        ahead_s = (min(self._due) - target).total_seconds() / rate
        return min(POLL_S, max(0.0, ahead_s))

    def _send(self, data: bytes) -> None:
        if not data or not self._link.connected:
            return
        try:
            self._link.send(data, self._stop.is_set)
        except PeerLostError as exc:
            self._disconnected(exc)

    def _read_acks(self, timeout_s: float) -> None:
        if not self._link.connected:
            return
        try:
            data = self._link.receive(timeout_s)
        except PeerLostError as exc:
            self._disconnected(exc)
            return
        for item in self._decoder.feed(data):
            if isinstance(item, Frame) and item.msg_type == TYPE_ACK:
                first_seq, last_seq = ack_range(item)
                if not self._line.ack(item.pump_id, item.boot_id, first_seq, last_seq):
                    log.debug("ack for unknown pump or boot %s:%s", item.pump_id, item.boot_id)
            else:
                log.debug("ignored from the reader: %r", item)

    def _disconnected(self, exc: PeerLostError) -> None:
        log.info("reader gone (%s); the clock pauses until one connects", exc)
        self._clock.pause()

    def _await_acks(self) -> bool:
        deadline = time.monotonic() + self._opt.ack_timeout_s
        resend_at = time.monotonic() + RESEND_UNACKED_AFTER_S
        while self._line.unacked and not self._stop.is_set():
            if time.monotonic() >= resend_at and self._link.connected:
                # Frames the reader never saw (e.g. discarded when it opened the line).
                resend_at = time.monotonic() + RESEND_UNACKED_AFTER_S
                log.info("re-sending %d unacknowledged frames", self._line.queue_retransmit())
                self._send(self._line.take(final=True))
            if time.monotonic() >= deadline:
                log.warning(
                    "%d frames still unacknowledged after %.0f s",
                    self._line.unacked,
                    self._opt.ack_timeout_s,
                )
                return False
            if not self._link.connected:
                if self._reconnect():
                    self._send(self._line.take(final=True))
                continue
            self._read_acks(POLL_S)
        return self._line.unacked == 0
