"""Outbox paths shaped for speed: cursors written with the next commit, payload-free reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway import outbox as outbox_module
from gateway.outbox import Outbox
from gateway.records import OutRecord


def rec(i: int) -> OutRecord:
    return OutRecord("reading", f"P0001:b:{i}", "P0001", b'{"i":%d}' % i, b"m f=1 %d" % i)


def on_disk(path: Path, sink: str) -> int:
    """The cursor as another process (or a restart after a crash) would read it."""
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT seq FROM cursors WHERE sink = ?", (sink,)).fetchone()[0])
    finally:
        db.close()


@pytest.fixture
def lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Acks never write on their own during the test."""
    monkeypatch.setattr(outbox_module, "CURSOR_WRITE_EVERY_S", 3600.0)


@pytest.mark.usefixtures("lazy")
def test_an_ack_moves_the_cursor_at_once_and_reaches_disk_with_the_next_append(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"])
    box.append([rec(i) for i in range(5)])
    box.ack("mqtt", 3)
    assert box.cursor("mqtt") == 3
    assert box.backlog("mqtt")[0] == 2
    assert on_disk(tmp_path / "o.db", "mqtt") == 0
    box.append([rec(5)])
    assert on_disk(tmp_path / "o.db", "mqtt") == 3


@pytest.mark.usefixtures("lazy")
def test_a_crash_before_the_cursor_is_written_means_redelivery_never_loss(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"])
    box.append([rec(i) for i in range(5)])
    box.ack("mqtt", 4)
    again = Outbox(tmp_path / "o.db", ["mqtt"])  # the first one is never closed: a kill -9
    assert again.cursor("mqtt") == 0
    assert [r.seq for r in again.read("mqtt", again.cursor("mqtt"), 10)] == [1, 2, 3, 4, 5]


def test_an_ack_writes_the_cursor_itself_once_the_last_write_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "CURSOR_WRITE_EVERY_S", 0.0)
    box = Outbox(tmp_path / "o.db", ["mqtt", "influx"])
    box.append([rec(i) for i in range(3)])
    box.ack("influx", 2)
    assert on_disk(tmp_path / "o.db", "influx") == 2
    assert on_disk(tmp_path / "o.db", "mqtt") == 0


@pytest.mark.usefixtures("lazy")
def test_close_and_compaction_write_moved_cursors(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["mqtt"], retention_s=3600.0)
    box.append([rec(i) for i in range(4)])
    box.ack("mqtt", 2)
    box.compact(now_s=0.0)
    assert on_disk(tmp_path / "o.db", "mqtt") == 2
    box.ack("mqtt", 4)
    box.close()
    assert on_disk(tmp_path / "o.db", "mqtt") == 4


def test_read_lines_returns_the_rows_of_read_without_their_payloads(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ["influx"])
    box.append([rec(i) for i in range(3)] + [OutRecord("pump_status", "s1", "P0001", b"{}")])
    full, lines = box.read("influx", 1, 10), box.read_lines("influx", 1, 10)
    assert [r.payload for r in lines] == [b"", b"", b""]
    assert [r.line for r in lines] == [r.line for r in full] == [b"m f=1 1", b"m f=1 2", None]
    assert [(r.seq, r.kind, r.record_id, r.stored_at_s) for r in lines] == [
        (r.seq, r.kind, r.record_id, r.stored_at_s) for r in full
    ]
