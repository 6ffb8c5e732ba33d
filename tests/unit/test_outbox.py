"""The outbox: committed before delivery, one cursor per sink, bounded, compacted, restartable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.outbox import HEADROOM_ROWS, Outbox, OutboxFullError, OutRecord


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
    assert again.load_state("engine") == b"snapshot-1"
    assert [r.record_id for r in again.read("mqtt", 2, 10)] == ["P0001:b:2"]
    assert again.append([rec(9)]) == 4


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
