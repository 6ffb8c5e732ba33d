"""The MQTT delivery window: records in flight, in outbox order, until acknowledged.

Pure: no clock, no I/O (time is a parameter). A `Lane` holds the rows of one outbox range
as `Slot`s in seq order; the outbox cursor may move only over the contiguous acknowledged
prefix (`advance`), so a record acknowledged out of order never lets an earlier one be
forgotten. A lost connection makes every unacknowledged slot unsent again (`unsend`): they
are published again, at least once. A replay lane (a bounded backlog) is paced by a
`RateBucket`. The MQTT sink (gateway.adapters.mqtt) drives these with paho's PUBACKs.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from gateway.records import StoredRecord

REPLAY_BURST_S: Final = 0.1
"""The replay rate limiter lets this many seconds' worth of rows out at once."""


@dataclass(slots=True)
class Slot:
    """One record in the window: unsent (mid None), on the wire (mid), or acknowledged."""

    record: StoredRecord
    mid: int | None = None
    acked: bool = False
    retry_at_s: float = 0.0


class Lane:
    """Rows of one outbox range (after_seq, upto_seq] in seq order until acknowledged."""

    def __init__(self, after_seq: int, upto_seq: int | None = None) -> None:
        self.read_to = after_seq
        self.acked_to = after_seq
        self.upto = upto_seq
        self.read_all = upto_seq is not None and after_seq >= upto_seq
        self.slots: OrderedDict[int, Slot] = OrderedDict()
        self.ahead: deque[StoredRecord] = deque()
        """Rows read from the outbox after read_to and not yet taken."""

    @property
    def done(self) -> bool:
        return self.read_all and not self.slots

    def take(self, rows: list[StoredRecord], asked: int) -> list[Slot]:
        """Add rows read after read_to; rows past upto_seq are left for the next lane."""
        if self.upto is not None:
            kept = [r for r in rows if r.seq <= self.upto]
            self.read_all = len(kept) < len(rows) or len(rows) < asked
            rows = kept
        new = [Slot(r) for r in rows]
        for slot in new:
            self.slots[slot.record.seq] = slot
        if rows:
            self.read_to = rows[-1].seq
        return new

    def advance(self) -> bool:
        """Drop the acknowledged prefix; return whether acked_to moved."""
        moved = False
        while self.slots:
            seq, slot = next(iter(self.slots.items()))
            if not slot.acked:
                break
            del self.slots[seq]
            self.acked_to, moved = seq, True
        if self.done and self.upto is not None and self.acked_to < self.upto:
            self.acked_to, moved = self.upto, True
        return moved

    def unsend(self) -> None:
        """The connection is gone: nothing unacknowledged is on its way any more."""
        for slot in self.slots.values():
            if not slot.acked:
                slot.mid, slot.retry_at_s = None, 0.0

    def due(self, now_m: float) -> Iterator[Slot]:
        """Slots waiting to be (re)sent whose retry time has come, in seq order."""
        return (s for s in self.slots.values() if s.mid is None and not s.acked
                and s.retry_at_s <= now_m)

    @property
    def on_the_wire(self) -> int:
        """Slots published and waiting for their PUBACK."""
        return sum(1 for s in self.slots.values() if s.mid is not None)


def held(lanes: Iterable[Lane]) -> int:
    """Records the window holds (sent or not), across its lanes."""
    return sum(len(lane.slots) for lane in lanes)


def next_retry_m(lanes: Iterable[Lane], now_m: float) -> float | None:
    """The earliest future time a held-back slot may be sent again, or None."""
    return min((s.retry_at_s for lane in lanes for s in lane.slots.values()
                if s.mid is None and not s.acked and s.retry_at_s > now_m), default=None)


class RateBucket:
    """Token bucket for the replay rate."""

    def __init__(self, rate_per_s: float, now_m: float) -> None:
        self.rate = rate_per_s
        self.burst = max(1.0, rate_per_s * REPLAY_BURST_S)
        self.tokens = self.burst
        self._at = now_m

    def refill(self, now_m: float) -> int:
        self.tokens = min(self.burst, self.tokens + (now_m - self._at) * self.rate)
        self._at = now_m
        return int(self.tokens)

    def wait_s(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)
