"""The pumps' side of the serial line: frames, deliberate damage, retransmission, tally.

Pure: no I/O, no clock. Damage keeps exact accounting with schemas.codec.FrameDecoder:
every damaged frame gives exactly one FrameError, and so does every garbage run.
- bitflip: one bit between `$` and `*` flipped, never creating or destroying `$`, `\\r`
  or `\\n`, so the CRC-32 check fails (a CRC catches every single-bit error);
- truncated: the frame cut short without its line end and followed directly by the
  next frame's `$` (everything after the last complete frame is held back until one
  follows, so it also holds across writes and reconnects);
- oversized: a checksummed frame padded past MAX_FRAME_BYTES, ending in `\\r\\n`;
- garbage: a run of bytes with no `$`, `\\r` or `\\n`, written only right after a
  complete frame and right before the next one (so it neither merges with another
  run nor disappears into a truncated frame); it is counted when written.
A damaged frame is lost, as on a real line; only intact frames are kept for
retransmission until the gateway acknowledges them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from random import Random
from typing import Any, Final

from schemas.codec import MAX_FRAME_BYTES, crc32_hex, encode_message
from schemas.models import DeviceMessageModel

FORBIDDEN_BYTES: Final = frozenset(b"$\r\n")
GARBAGE_ALPHABET: Final = bytes(b for b in range(256) if b not in FORBIDDEN_BYTES)
GARBAGE_MAX_BYTES: Final = 64
OVERSIZE_EXTRA_MAX_BYTES: Final = 512
CHECKSUM_TAIL_BYTES: Final = len(b"*XXXXXXXX\r\n")
RETRANSMIT_MAX_FRAMES: Final = 100_000
"""Unacknowledged frames kept per pump; older ones are evicted (and counted)."""
RETRANSMIT_MAX_BYTES: Final = 256 * 1024 * 1024
"""Memory for unacknowledged frames, shared by all pumps of a run."""
DAMAGE_KINDS: Final = ("bitflip", "truncated", "oversized")
FRAME_TYPES: Final = ("info", "reading", "event")


@dataclass(frozen=True, slots=True)
class LineDamage:
    """Fractions of frames damaged on purpose, by kind; `garbage` is per gap before a frame."""

    bitflip: float = 0.0
    truncated: float = 0.0
    oversized: float = 0.0
    garbage: float = 0.0

    def __post_init__(self) -> None:
        rates = (self.bitflip, self.truncated, self.oversized, self.garbage)
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates[:3]) > 1.0:
            raise ValueError("damage rates must be in [0, 1] and the frame kinds sum to <= 1")

    @property
    def any(self) -> bool:
        return any((self.bitflip, self.truncated, self.oversized, self.garbage))


def flip_bit(frame: bytes, u_pos: float, u_bit: float) -> bytes:
    """Flip one bit of the body (between `$` and `*`) without making or breaking `$`, CR, LF."""
    body_len = len(frame) - 1 - CHECKSUM_TAIL_BYTES
    pos = 1 + min(body_len - 1, int(u_pos * body_len))
    first = int(u_bit * 8)
    for i in range(8):
        flipped = frame[pos] ^ (1 << ((first + i) % 8))
        if flipped not in FORBIDDEN_BYTES:
            return frame[:pos] + bytes((flipped,)) + frame[pos + 1 :]
    raise AssertionError("unreachable: at most three of eight flips hit a forbidden byte")


def truncate(frame: bytes, u_cut: float) -> bytes:
    """The frame cut short, at least `$` and one byte kept, its line end always lost."""
    cut = 2 + min(len(frame) - 5, int(u_cut * (len(frame) - 4)))
    return frame[:cut]


def oversize(frame: bytes, u_extra: float) -> bytes:
    """The same message padded (and re-checksummed) past MAX_FRAME_BYTES."""
    body = frame[1:-CHECKSUM_TAIL_BYTES]
    pad = MAX_FRAME_BYTES - len(frame) + 1 + int(u_extra * OVERSIZE_EXTRA_MAX_BYTES)
    body = body[:-1] + b',"pad":"' + b"0" * max(1, pad) + b'"}'
    return b"$" + body + b"*" + crc32_hex(body) + b"\r\n"


def garbage_run(rng: Random, u_len: float) -> bytes:
    """1 to GARBAGE_MAX_BYTES bytes that contain no `$`, CR or LF."""
    size = 1 + int(u_len * GARBAGE_MAX_BYTES)
    return bytes(GARBAGE_ALPHABET[b % len(GARBAGE_ALPHABET)] for b in rng.randbytes(size))


def add_noise(data: bytes, rate: float, rng: Random) -> bytes:
    """Raw line noise: one random bit flipped in about `rate` of the bytes (no accounting)."""
    if rate <= 0.0 or not data:
        return data
    out = bytearray(data)
    log_keep = math.log1p(-min(rate, 0.999999))
    pos = -1
    while True:
        pos += 1 + int(math.log(1.0 - rng.random()) / log_keep)
        if pos >= len(out):
            return bytes(out)
        out[pos] ^= 1 << rng.randrange(8)


@dataclass(slots=True)
class PumpTally:
    """What one pump put on the line, for the exit summary."""

    pump_id: str
    boot_id: str
    first_seq: int | None = None
    last_seq: int | None = None
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FRAME_TYPES, 0))
    damaged: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DAMAGE_KINDS, 0))
    garbage_runs: int = 0
    retransmitted: int = 0
    evicted: int = 0
    damaged_seqs: list[int] = field(default_factory=list)
    unsent_seqs: list[int] = field(default_factory=list)
    """Numbers the pump used for frames it never put on the line (a dropout, a lost record)."""

    def as_json(self, unacked: int) -> dict[str, Any]:
        return {
            "pump_id": self.pump_id,
            "boot_id": self.boot_id,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "sent": dict(self.sent),
            "damaged": dict(self.damaged),
            "garbage_runs": self.garbage_runs,
            "retransmitted": self.retransmitted,
            "unacked": unacked,
            "evicted_unacked": self.evicted,
            "damaged_seqs": list(self.damaged_seqs),
            "unsent_seqs": list(self.unsent_seqs),
        }


class PumpLine:
    """One pump's frames: encoded, some damaged on purpose, intact ones kept until acked."""

    def __init__(
        self,
        pump_id: str,
        boot_id: str,
        damage: LineDamage,
        rng: Random,
        retransmit_max_frames: int = RETRANSMIT_MAX_FRAMES,
        retransmit_max_bytes: int = RETRANSMIT_MAX_BYTES,
    ) -> None:
        self.tally = PumpTally(pump_id, boot_id)
        self._damage = damage
        self._rng = rng
        self._max_frames = retransmit_max_frames
        self._max_bytes = retransmit_max_bytes
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._unacked_bytes = 0

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def encode(self, messages: Iterable[DeviceMessageModel]) -> Iterator[tuple[str, bytes]]:
        """Yield (kind, bytes) chunks: kind is 'intact', a damage kind, or 'garbage'."""
        for message in messages:
            frame = encode_message(message)
            self._count_seq(message.seq)
            if not self._damage.any:
                yield self._intact(message, frame)
                continue
            u_kind, u_gap, u_a, u_b = (self._rng.random() for _ in range(4))
            if u_gap < self._damage.garbage:
                yield "garbage", garbage_run(self._rng, u_a)
            kind = self._damage_kind(u_kind)
            if kind is None:
                yield self._intact(message, frame)
            else:
                self.tally.damaged[kind] += 1
                self.tally.damaged_seqs.append(message.seq)
                yield kind, _damaged(kind, frame, u_a, u_b)

    def ack(self, first_seq: int, last_seq: int) -> None:
        """Frames `first_seq`..`last_seq` are stored by the gateway: forget them."""
        if self._unacked and self._unacked[0][0] >= first_seq:
            while self._unacked and self._unacked[0][0] <= last_seq:
                self._unacked_bytes -= len(self._unacked.popleft()[1])
            return
        kept = deque(e for e in self._unacked if not first_seq <= e[0] <= last_seq)
        self._unacked_bytes = sum(len(frame) for _, frame in kept)
        self._unacked = kept

    def retransmit(self) -> list[bytes]:
        """The unacknowledged intact frames, oldest first, counted as retransmitted."""
        self.tally.retransmitted += len(self._unacked)
        return [frame for _, frame in self._unacked]

    def _damage_kind(self, u: float) -> str | None:
        d = self._damage
        if u < d.bitflip:
            return "bitflip"
        if u < d.bitflip + d.truncated:
            return "truncated"
        return "oversized" if u < d.bitflip + d.truncated + d.oversized else None

    def _intact(self, message: DeviceMessageModel, frame: bytes) -> tuple[str, bytes]:
        self.tally.sent[message.kind] += 1
        if self._max_frames > 0:
            self._unacked.append((message.seq, frame))
            self._unacked_bytes += len(frame)
            while len(self._unacked) > self._max_frames or self._unacked_bytes > self._max_bytes:
                self._unacked_bytes -= len(self._unacked.popleft()[1])
                self.tally.evicted += 1
        return "intact", frame

    def _count_seq(self, seq: int) -> None:
        tally = self.tally
        if tally.first_seq is None:
            tally.first_seq = seq
        elif tally.last_seq is not None and seq > tally.last_seq + 1:
            tally.unsent_seqs.extend(range(tally.last_seq + 1, seq))
        tally.last_seq = seq


def _damaged(kind: str, frame: bytes, u_a: float, u_b: float) -> bytes:
    if kind == "bitflip":
        return flip_bit(frame, u_a, u_b)
    if kind == "truncated":
        return truncate(frame, u_a)
    return oversize(frame, u_a)


class Line:
    """The shared byte stream of all pumps, batched per tick, with optional raw noise."""

    def __init__(self, pump_lines: Iterable[PumpLine], noise_rate: float = 0.0, seed: int = 0):
        self.pumps = {p.tally.pump_id: p for p in pump_lines}
        self._noise_rate = noise_rate
        self._noise_rng = Random(f"{seed}:noise")
        self._out = bytearray()
        self._held = bytearray()  # everything after the last complete frame
        self._garbage: deque[tuple[str, bytes]] = deque()

    def add(self, pump_id: str, messages: Iterable[DeviceMessageModel]) -> int:
        """Append one pump's messages; return how many frames went on the line."""
        frames = 0
        for kind, chunk in self.pumps[pump_id].encode(messages):
            if kind == "garbage":
                self._garbage.append((pump_id, chunk))
            else:
                self._frame(kind, chunk)
                frames += 1
        return frames

    def queue_retransmit(self) -> int:
        """Queue every pump's unacknowledged frames (after a (re)connect); return how many."""
        count = 0
        for pump in self.pumps.values():
            for frame in pump.retransmit():
                self._frame("intact", frame)
                count += 1
        return count

    def _frame(self, kind: str, chunk: bytes) -> None:
        if self._garbage and not self._held:  # right after a complete frame: a legal gap
            pump_id, junk = self._garbage.popleft()
            self.pumps[pump_id].tally.garbage_runs += 1
            self._held += junk
        self._held += chunk
        if kind != "truncated":
            self._out += self._held
            self._held.clear()

    def take(self, final: bool = False) -> bytes:
        """The bytes to write now; truncated frames at the end wait for a successor unless final."""
        if final:
            self._out += self._held
            self._held.clear()
        data = bytes(self._out)
        self._out.clear()
        return add_noise(data, self._noise_rate, self._noise_rng)

    def ack(self, pump_id: str, boot_id: str, first_seq: int, last_seq: int) -> bool:
        """Apply one gateway acknowledgement; False if it names no pump of this run."""
        pump = self.pumps.get(pump_id)
        if pump is None or pump.tally.boot_id != boot_id:
            return False
        pump.ack(first_seq, last_seq)
        return True

    @property
    def unacked(self) -> int:
        return sum(p.unacked for p in self.pumps.values())

    def summary(self) -> dict[str, Any]:
        """Per-pump tallies and their totals, as one JSON-ready object."""
        pumps = [p.tally.as_json(p.unacked) for p in self.pumps.values()]
        totals: dict[str, Any] = {
            "sent": {t: sum(p["sent"][t] for p in pumps) for t in FRAME_TYPES},
            "damaged": {k: sum(p["damaged"][k] for p in pumps) for k in DAMAGE_KINDS},
        }
        for key in ("garbage_runs", "retransmitted", "unacked", "evicted_unacked"):
            totals[key] = sum(p[key] for p in pumps)
        totals["frames_intact"] = sum(totals["sent"].values())
        totals["frames_damaged"] = sum(totals["damaged"].values())
        return {"pumps": pumps, "totals": totals}
