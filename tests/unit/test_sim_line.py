"""Line damage keeps exact accounting with the real decoder; retransmission and acks."""

from __future__ import annotations

from datetime import UTC, datetime
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import MAX_FRAME_BYTES, Frame, FrameDecoder, FrameError, encode_message
from schemas.models import Drug, PumpState, Reading
from simulator.line import (
    Line,
    LineDamage,
    PumpLine,
    add_noise,
    flip_bit,
    garbage_run,
    oversize,
    truncate,
)

NOW = datetime(2024, 3, 1, tzinfo=UTC)
unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def reading(seq: int, pump_id: str = "P0001") -> Reading:
    return Reading(
        pump_id=pump_id, boot_id="0badcafe", seq=seq, device_time=NOW, received_at=NOW,
        drug=Drug.BACLOFEN, pump_state=PumpState.RUNNING, reservoir_ml=12.5,
        reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=2.0, basal_rate_ml_per_day=0.4,
        delivered_total_ml=101.25,
    )


FRAME = encode_message(reading(7))
NEXT = encode_message(reading(8))


def decode(data: bytes) -> list[Frame | FrameError]:
    decoder = FrameDecoder()
    return decoder.feed(data) + decoder.flush()


def kinds(items: list[Frame | FrameError]) -> list[str]:
    return [i.kind if isinstance(i, FrameError) else f"frame:{i.seq}" for i in items]


@given(unit, unit)
def test_bit_flip_changes_one_bit_and_gives_exactly_one_checksum_error(u_pos: float,
                                                                       u_bit: float) -> None:
    damaged = flip_bit(FRAME, u_pos, u_bit)
    diff = [a ^ b for a, b in zip(FRAME, damaged, strict=True) if a != b]
    assert len(diff) == 1
    assert bin(diff[0]).count("1") == 1
    for byte in b"$\r\n":
        assert damaged.count(byte) == FRAME.count(byte)
    assert kinds(decode(damaged + NEXT)) == ["checksum", "frame:8"]


@given(unit)
def test_truncated_frame_gives_exactly_one_error_before_the_next_frame(u: float) -> None:
    damaged = truncate(FRAME, u)
    assert 2 <= len(damaged) < len(FRAME) - 2
    assert b"\n" not in damaged
    assert kinds(decode(damaged + NEXT)) == ["truncated", "frame:8"]


@given(unit)
def test_oversized_frame_gives_exactly_one_error_and_ends_its_line(u: float) -> None:
    damaged = oversize(FRAME, u)
    assert len(damaged) > MAX_FRAME_BYTES
    assert damaged.endswith(b"\r\n")
    assert damaged.count(b"$") == 1
    assert kinds(decode(damaged + NEXT)) == ["oversized", "frame:8"]


@given(st.integers(min_value=0, max_value=10_000), unit)
def test_garbage_run_is_one_error_reported_at_the_next_frame(seed: int, u: float) -> None:
    junk = garbage_run(Random(seed), u)
    assert junk
    assert not set(junk) & set(b"$\r\n")
    assert kinds(decode(FRAME + junk + NEXT)) == ["frame:7", "garbage", "frame:8"]


def test_noisy_pump_line_accounts_for_every_damaged_frame_and_garbage_run() -> None:
    damage = LineDamage(bitflip=0.1, truncated=0.1, oversized=0.05, garbage=0.1)
    pump = PumpLine("P0001", "0badcafe", damage, Random(5))
    line = Line([pump])
    wire = bytearray()
    for seq in range(1, 2001):
        line.add("P0001", [reading(seq)])
        wire += line.take()
    wire += line.take(final=True)
    items = decode(bytes(wire))
    errors = [i.kind for i in items if isinstance(i, FrameError)]
    frames = [i.seq for i in items if isinstance(i, Frame)]
    tally = pump.tally
    assert errors.count("checksum") == tally.damaged["bitflip"] > 100
    assert errors.count("truncated") == tally.damaged["truncated"] > 100
    assert errors.count("oversized") == tally.damaged["oversized"] > 50
    assert errors.count("garbage") == tally.garbage_runs > 100
    assert len(errors) == sum(tally.damaged.values()) + tally.garbage_runs
    assert set(frames).isdisjoint(tally.damaged_seqs)
    assert sorted(frames + tally.damaged_seqs) == list(range(1, 2001))
    assert len(frames) == tally.sent["reading"]


def test_truncated_frames_wait_for_a_successor_and_garbage_only_follows_complete_frames() -> None:
    truncating = PumpLine("P0001", "0badcafe", LineDamage(truncated=1.0), Random(1))
    garbling = PumpLine("P0002", "0badcafe", LineDamage(garbage=1.0), Random(2))
    line = Line([truncating, garbling])
    line.add("P0001", [reading(1), reading(2)])
    assert line.take() == b""  # held: nothing but a frame may follow a truncated one
    line.add("P0002", [reading(1, "P0002"), reading(2, "P0002")])
    wire = line.take(final=True)
    assert kinds(decode(wire)) == ["truncated", "truncated", "frame:1", "garbage", "frame:2"]
    assert garbling.tally.garbage_runs == 1  # the run that found no legal gap was not sent


def test_ack_forgets_frames_up_to_seq_and_retransmit_resends_the_rest_in_order() -> None:
    pump = PumpLine("P0001", "0badcafe", LineDamage(), Random(1))
    line = Line([pump])
    line.add("P0001", [reading(seq) for seq in range(1, 11)])
    line.take()
    assert line.ack("P0001", "0badcafe", 0, 6)
    assert not line.ack("P0001", "deadbeef", 0, 10)  # another boot of the pump
    assert not line.ack("P0404", "0badcafe", 0, 10)
    assert line.unacked == 4
    assert line.queue_retransmit() == 4
    assert kinds(decode(line.take())) == ["frame:7", "frame:8", "frame:9", "frame:10"]
    assert pump.tally.retransmitted == 4
    assert line.summary()["totals"]["unacked"] == 4


def test_damaged_frames_are_never_kept_for_retransmission() -> None:
    pump = PumpLine("P0001", "0badcafe", LineDamage(bitflip=1.0), Random(1))
    line = Line([pump])
    line.add("P0001", [reading(seq) for seq in range(1, 4)])
    assert line.unacked == 0
    assert pump.tally.damaged_seqs == [1, 2, 3]


def test_retransmit_buffer_is_bounded_and_counts_evictions() -> None:
    pump = PumpLine("P0001", "0badcafe", LineDamage(), Random(1), retransmit_max_frames=5)
    Line([pump]).add("P0001", [reading(seq) for seq in range(1, 21)])
    assert pump.unacked == 5
    assert pump.tally.evicted == 15
    assert pump.retransmit() == [encode_message(reading(s)) for s in range(16, 21)]


def test_line_noise_flips_about_the_requested_share_of_bytes() -> None:
    data = bytes(200_000)
    noisy = add_noise(data, 0.01, Random(3))
    flipped = sum(1 for b in noisy if b)
    assert 1_700 < flipped < 2_300
    assert add_noise(data, 0.0, Random(3)) == data


def test_damage_rates_above_one_are_rejected() -> None:
    with pytest.raises(ValueError, match="sum"):
        LineDamage(bitflip=0.6, truncated=0.6)


def test_range_ack_forgets_only_that_range_so_a_lost_frame_is_resent() -> None:
    pump = PumpLine("P0001", "0badcafe", LineDamage(), Random(1))
    line = Line([pump])
    line.add("P0001", [reading(seq) for seq in range(1, 11)])
    line.take()
    assert line.ack("P0001", "0badcafe", 3, 10)  # frames 1 and 2 never reached the reader
    assert line.unacked == 2
    line.queue_retransmit()
    assert kinds(decode(line.take())) == ["frame:1", "frame:2"]
