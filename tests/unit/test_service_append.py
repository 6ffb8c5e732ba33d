"""Gateway._append: on a nearly full disk a batch is stored in parts, state with the last."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import pytest

from gateway.outbox import OutboxFullError, OutRecord
from gateway.service import Gateway


class TightOutbox:
    """Refuses any append of more than `fits` records as a full disk (or as a row limit)."""

    def __init__(self, fits: int, *, disk: bool = True) -> None:
        self.fits, self.disk = fits, disk
        self.appends: list[tuple[list[str], bool]] = []

    def append(self, records: Sequence[OutRecord], state: Mapping[str, bytes] | None) -> int:
        if len(records) > self.fits:
            raise OutboxFullError("full", disk=self.disk)
        self.appends.append(([r.record_id for r in records], state is not None))
        return len(self.appends)


def records(n: int) -> list[OutRecord]:
    return [OutRecord("reading", f"P:b:{i}", "P", b"{}") for i in range(n)]


def append(outbox: TightOutbox, batch: list[OutRecord], state: dict[str, bytes] | None) -> None:
    Gateway._append(SimpleNamespace(outbox=outbox), batch, state)  # type: ignore[arg-type]


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


def test_the_row_limit_is_not_split_around() -> None:
    outbox, batch = TightOutbox(fits=3, disk=False), records(7)
    with pytest.raises(OutboxFullError):
        append(outbox, batch, None)
    assert outbox.appends == []
    assert len(batch) == 7


def test_state_alone_is_stored() -> None:
    outbox = TightOutbox(fits=3)
    append(outbox, [], {"engine": b"s"})
    assert outbox.appends == [([], True)]
