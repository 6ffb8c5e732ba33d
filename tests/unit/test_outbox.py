"""The outbox: committed before delivery, one cursor per sink, bounded, compacted, restartable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.outbox import HEADROOM_ROWS, Outbox, OutboxFullError
from gateway.records import OutRecord


def rec(i: int, kind: str = "reading", pump: str = "P0001") -> OutRecord:
    return OutRecord(kind, f"{pump}:b:{i}", pump, b'{"i":%d}' % i, b"m f=1 %d" % i)


def test_each_sink_keeps_its_own_cursor_and_backlog(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt", "influx"])
    last = box.append([rec(i) for i in range(10)])
    assert last == 10
    box.ack("mqtt", 10)
    box.ack("influx", 4)
    assert box.backlog("mqtt") == (0, None)
    pending, oldest = box.backlog("influx")
    assert pending == 6
    assert oldest is not None
    assert [r.seq for r in box.read("influx", box.cursor("influx"), 100)] == list(range(5, 11))


def test_a_cursor_never_moves_back(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"])
    box.append([rec(i) for i in range(5)])
    box.ack("mqtt", 4)
    box.ack("mqtt", 2)
    assert box.cursor("mqtt") == 4


def test_records_cursors_and_state_survive_a_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"])
    box.append([rec(i) for i in range(3)], state={"engine": b"snapshot-1"})
    box.ack("mqtt", 2)
    box.close()
    again = Outbox(tmp_path / "o.db", ["mqtt"])
    assert again.cursor("mqtt") == 2
    assert again.load_states("engine").get("engine") == b"snapshot-1"
    assert [r.record_id for r in again.read("mqtt", 2, 10)] == ["P0001:b:2"]
    assert again.append([rec(9)]) == 4


def test_state_rows_load_by_prefix_and_a_none_value_deletes_its_row(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"])
    rows = {"a/1": b"1", "a/2": b"2", "a/\U0001f600": b"3", "a": b"0", "ab/1": b"x",
            "a_/1": b"y", "a%/1": b"z", "b/1": b"w"}  # fmt: skip
    box.append([], rows)
    assert box.load_states("a/") == {"a/1": b"1", "a/2": b"2", "a/\U0001f600": b"3"}
    assert box.load_states("a_/") == {"a_/1": b"y"}  # no LIKE: `_` and `%` are themselves
    assert box.load_states("a%/") == {"a%/1": b"z"}
    assert len(box.load_states("a")) == 7
    assert box.load_states("c") == {}
    assert box.append([rec(1)], {"a/1": None, "a/2": b"two", "a/9": None}) == 1
    box.close()
    again = Outbox(tmp_path / "o.db", ["mqtt"])
    assert again.load_states("a/") == {"a/2": b"two", "a/\U0001f600": b"3"}
    assert again.load_states("a/1").get("a/1") is None


def test_a_full_outbox_refuses_telemetry_but_keeps_room_for_alerts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"], max_pending=5)
    box.append([rec(i) for i in range(5)])
    with pytest.raises(OutboxFullError, match="limit 5"):
        box.append([rec(99)])
    assert box.pending() == 5  # nothing was written
    box.append([rec(100, kind="alert")])
    assert box.pending() == 6
    box.ack("mqtt", 6)
    box.append([rec(101)])
    assert HEADROOM_ROWS > 0


def test_compaction_deletes_only_rows_every_sink_delivered_and_older_than_retention(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt", "influx"], retention_s=0.0)
    box.append([rec(i) for i in range(10)])
    box.ack("mqtt", 8)
    box.ack("influx", 5)
    stored_at = box.read("mqtt", 0, 1)[0].stored_at_s
    assert box.compact(now_s=stored_at + 1) == 5
    assert [r.seq for r in box.read("mqtt", 0, 100)] == [6, 7, 8, 9, 10]


def test_history_returns_a_pumps_newest_records_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"])
    box.append([rec(1, pump="A"), rec(2, pump="B"), rec(3, pump="A")])
    assert [r.record_id for r in box.history("A", 10)] == ["A:b:3", "A:b:1"]
    assert box.recent_record_ids(10) == ["A:b:1", "B:b:2", "A:b:3"]


def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.db", ["mqtt"]).close()
    with sqlite3.connect(tmp_path / "o.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


class ShrinkingDisk:
    """A filesystem of `size_bytes` on which each stored row takes `row_bytes`."""

    def __init__(self, box: Outbox, size_bytes: int, row_bytes: int) -> None:
        self.box, self.size_bytes, self.row_bytes = box, size_bytes, row_bytes

    def free(self) -> int:
        rows = self.box._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        return int(self.size_bytes - rows * self.row_bytes)


def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> Outbox:
    box = Outbox(tmp_path / "o.db", ["mqtt", "influx"], min_free_bytes=10_000)
    disk = ShrinkingDisk(box, size, 1_000)
    monkeypatch.setattr(box, "free_disk_bytes", disk.free)
    return box


def test_below_the_disk_floor_readings_wait_but_alerts_still_go_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = small_disk(tmp_path, monkeypatch, 40_000)
    box.append([rec(i) for i in range(31)])  # checked at 11,000 free: above the floor
    with pytest.raises(OutboxFullError) as refused:
        box.append([rec(31), rec(32)])  # 9,000 free
    assert refused.value.disk
    assert "nearly full (8 KiB free" in str(refused.value)
    assert "store.min_free_disk_kb" in str(refused.value)
    box.append([rec(99, kind="alert")])
    assert box.pending() == 32


def test_delivered_history_makes_way_before_reading_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = small_disk(tmp_path, monkeypatch, 40_000)
    box.append([rec(i) for i in range(31)])
    box.ack("mqtt", 20)
    box.ack("influx", 25)  # the slowest sink has delivered 20 rows
    box.append([rec(31), rec(32)])  # fits once those 20 are deleted, whatever their age
    assert box.freed_rows == 20
    assert [r.seq for r in box.read("mqtt", 0, 100)] == list(range(21, 34))
    assert box.pending() == 13, "no undelivered row was deleted"


def test_reading_resumes_only_at_twice_the_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = small_disk(tmp_path, monkeypatch, 40_000)
    box.append([rec(i) for i in range(31)])
    with pytest.raises(OutboxFullError):
        box.append([rec(31)])
    box.ack("mqtt", 10)
    box.ack("influx", 10)
    with pytest.raises(OutboxFullError):
        box.append([rec(31)])  # 19,000 free once 10 rows go: not yet twice the floor
    assert box.disk_low
    box.ack("mqtt", 12)
    box.ack("influx", 12)
    box.append([rec(31)])  # 21,000 free
    assert not box.disk_low


def test_free_space_deletes_every_delivered_row_and_gives_the_pages_back(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, ["mqtt"], retention_s=86_400)
    big = [OutRecord("reading", f"P:b:{i}", "P", b"x" * 2000) for i in range(1000)]
    box.append(big)
    box.ack("mqtt", 900)
    box.free_space()  # checkpoints: the rows are in the database file now
    assert box.compact(now_s=0) == 0, "retention keeps delivered rows from compaction"
    assert box.freed_rows == 900
    assert path.stat().st_size < 400 * 2000, "freed pages were not handed back"
    assert [r.seq for r in box.read("mqtt", 0, 2000)] == list(range(901, 1001))
