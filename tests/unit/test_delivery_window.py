"""The MQTT delivery window: pure, so its ordering rules are tested without a broker."""

from __future__ import annotations

import pytest

from gateway.delivery_window import Lane, RateBucket, held, next_retry_m
from gateway.records import StoredRecord


def rows(*seqs: int) -> list[StoredRecord]:
    return [StoredRecord(s, "reading", f"P1:b:{s}", "P1", b"{}", None, False, 0.0) for s in seqs]


def test_lane_acknowledges_only_the_contiguous_prefix() -> None:
    lane = Lane(after_seq=10)
    slots = lane.take(rows(11, 12, 13), asked=3)
    slots[1].acked = True
    assert not lane.advance()
    assert lane.acked_to == 10
    slots[0].acked = True
    assert lane.advance()
    assert lane.acked_to == 12
    assert list(lane.slots) == [13]


def test_lost_connection_makes_unacknowledged_slots_due_again() -> None:
    lane = Lane(after_seq=0)
    first, second = lane.take(rows(1, 2), asked=2)
    first.mid, second.mid, second.acked = 7, 8, True
    first.retry_at_s = 99.0
    lane.unsend()
    assert [s.record.seq for s in lane.due(now_m=0.0)] == [1]


def test_bounded_lane_stops_at_its_upper_seq_and_jumps_gaps_when_done() -> None:
    lane = Lane(after_seq=0, upto_seq=5)
    taken = lane.take(rows(1, 3, 6, 7), asked=4)
    assert [s.record.seq for s in taken] == [1, 3]
    assert lane.read_all
    for slot in taken:
        slot.acked = True
    assert lane.advance()
    assert lane.done
    assert lane.acked_to == 5


def test_replay_bucket_limits_the_rate() -> None:
    now = 1024.0
    bucket = RateBucket(rate_per_s=160.0, now_m=now)
    bucket.refill(now)
    bucket.tokens = 0.0
    assert bucket.refill(now + 1 / 32) == 5
    assert bucket.refill(now + 60.0) == 16, "a long pause earns at most 0.1 s worth"
    bucket.tokens = 0.5
    assert bucket.wait_s() == pytest.approx(0.5 / 160)


def test_window_counts_what_it_holds_and_what_is_on_the_wire() -> None:
    live, replay = Lane(after_seq=0), Lane(after_seq=100, upto_seq=110)
    a, b = live.take(rows(1, 2), asked=2)
    (c,) = replay.take(rows(101), asked=1)
    a.mid, c.mid = 1, 2
    assert held([live, replay]) == 3
    assert live.on_the_wire == 1
    assert replay.on_the_wire == 1
    b.acked = True
    assert held([live, replay]) == 3, "an acknowledged slot waits behind an earlier one"


def test_next_retry_is_the_earliest_held_back_slot() -> None:
    lane = Lane(after_seq=0)
    first, second, third = lane.take(rows(1, 2, 3), asked=3)
    first.retry_at_s, second.retry_at_s = 50.0, 40.0
    third.mid = 9  # on the wire: not waiting for a retry
    assert next_retry_m([lane], now_m=10.0) == 40.0
    assert next_retry_m([lane], now_m=45.0) == 50.0
    assert next_retry_m([lane], now_m=60.0) is None
    assert [s.record.seq for s in lane.due(now_m=45.0)] == [2]


def test_records_acknowledged_out_of_order_leave_in_outbox_order() -> None:
    lane = Lane(after_seq=0)
    slots = lane.take(rows(1, 2, 3, 4), asked=4)
    for i in (3, 1, 2):
        slots[i].acked = True
        lane.advance()
        assert lane.acked_to == 0
    slots[0].acked = True
    assert lane.advance()
    assert lane.acked_to == 4
    assert lane.done is False, "an unbounded lane is never done"
