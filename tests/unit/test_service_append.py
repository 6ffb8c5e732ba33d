"""append_split: a batch that does not fit is stored in parts, the state with the last."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from gateway.outbox import OutboxFullError
from gateway.records import OutRecord
from gateway.store_shell import append_split


class TightOutbox:
    """Refuses any append of more than `fits` records as a full disk (or as a row limit)."""

    def __init__(self, fits: int, *, disk: bool = True) -> None:
        self.fits, self.disk = fits, disk
        self.appends: list[tuple[list[str], bool]] = []

    room: int | None = None
    """Rows left in all (None: unlimited)."""

    def append(self, records: Sequence[OutRecord], state: Mapping[str, bytes] | None) -> int:
        if len(records) > self.fits or (self.room is not None and len(records) > self.room):
            raise OutboxFullError("full", disk=self.disk)
        if self.room is not None:
            self.room -= len(records)
        self.appends.append(([r.record_id for r in records], state is not None))
        return len(self.appends)


def records(n: int) -> list[OutRecord]:
    return [OutRecord("reading", f"P:b:{i}", "P", b"{}") for i in range(n)]


def append(outbox: TightOutbox, batch: list[OutRecord], state: dict[str, bytes] | None) -> None:
    append_split(outbox, batch, state)  # type: ignore[arg-type]


def test_a_batch_too_big_for_the_disk_goes_in_parts_in_order_with_the_state_last() -> None:
    outbox, batch = TightOutbox(fits=3), records(7)
    append(outbox, batch, {"engine": b"s"})
    stored = [rid for ids, _ in outbox.appends for rid in ids]
    assert stored == [f"P:b:{i}" for i in range(7)]
    assert [len(ids) for ids, _ in outbox.appends] == [3, 3, 1]
    assert [with_state for _, with_state in outbox.appends] == [False, False, True]
    assert batch == [], "stored parts are removed from the batch"


def test_a_part_that_never_fits_leaves_the_rest_for_the_retry() -> None:
    outbox, batch = TightOutbox(fits=0), records(4)
    with pytest.raises(OutboxFullError):
        append(outbox, batch, {"engine": b"s"})
    assert len(batch) == 4
    assert outbox.appends == []


def test_a_batch_larger_than_the_rows_left_goes_in_parts_and_the_rest_waits() -> None:
    outbox = TightOutbox(fits=3, disk=False)
    outbox.room = 3  # rows left under max_pending_records; each stored row uses one
    batch = records(7)
    with pytest.raises(OutboxFullError):
        append(outbox, batch, {"engine": b"s"})
    assert [ids for ids, _ in outbox.appends] == [["P:b:0", "P:b:1", "P:b:2"]]
    assert [with_state for _, with_state in outbox.appends] == [False]
    assert len(batch) == 4, "the rest waits for the sinks, then goes in"


def test_a_batch_larger_than_the_row_limit_itself_is_stored_once_there_is_room() -> None:
    outbox, batch = TightOutbox(fits=3, disk=False), records(10)
    append(outbox, batch, {"engine": b"s"})
    assert [len(ids) for ids, _ in outbox.appends] == [2, 2, 2, 2, 2]
    assert [rid for ids, _ in outbox.appends for rid in ids] == [f"P:b:{i}" for i in range(10)]
    assert outbox.appends[-1][1] is True


def test_state_alone_is_stored() -> None:
    outbox = TightOutbox(fits=3)
    append(outbox, [], {"engine": b"s"})
    assert outbox.appends == [([], True)]
