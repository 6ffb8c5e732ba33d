"""The durable outbox: every accepted record is committed here before any sink sees it.

SQLite in WAL mode. One table of records in arrival order, one cursor per sink
(the highest row that sink has really delivered), a small key-value table for
state that must survive a restart (the alert engine's rows, one per pump), committed in
the same transaction as the records it belongs to.

Full policy (docs/outbox.md): `append` raises OutboxFullError once `max_pending` rows
wait for the slowest sink, or when SQLite reports the disk full. The service then
stops reading its sources (back-pressure) and raises a technical alert; nothing
is dropped. State records (alerts, status) keep a reserve of HEADROOM_ROWS so the
alert that says "full" can still be stored. The disk counts as full below `min_free_bytes`
free (readings wait; alerts, status and cursors use the space left, so SQLite itself
rarely meets a full disk) until twice that is free again; `free_space` then gives
delivered rows up before their retention ends and hands the pages back.

Cursors: `ack` moves a sink's cursor in memory at once; the row in `cursors` is written
with the next `append` (its transaction, its fsync) or by `ack` itself once the last write
is CURSOR_WRITE_EVERY_S old, and on `compact` and `close`. An fsync per acknowledgement
cost more than the rest of MQTT delivery together (docs/performance.md). After a crash a
sink may therefore resume a little behind what it delivered: at least once, as before.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from gateway.errors import PumpgwError
from gateway.records import PRIORITY_KINDS, OutRecord, StoredRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    record_id TEXT NOT NULL,
    pump_id TEXT,
    payload BLOB NOT NULL,
    line BLOB,
    retain INTEGER NOT NULL,
    stored_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_pump ON records (pump_id, seq);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
HEADROOM_ROWS = 10_000
"""Rows kept in reserve above max_pending for alerts and status."""
COLUMNS = "seq, kind, record_id, pump_id, payload, line, retain, stored_at"
LINE_COLUMNS = "seq, kind, record_id, pump_id, X'', line, retain, stored_at"
"""read_lines: every column but the JSON payload, which a time-series sink never sends."""
WAL_CHECKPOINT_PAGES = 100
"""Checkpoint the write-ahead log every 400 KiB (SQLite's default is 4 MiB): rows live in
the database file, and a nearly full disk still has room to delete and vacuum them."""
FREE_SPACE_CHUNK_ROWS = 200
"""Delivered rows deleted per transaction when the disk is full."""
CURSOR_WRITE_EVERY_S = 1.0
"""Longest a moved cursor waits in memory for a commit to carry it (while acks keep coming)."""
STATE_KEY_END = "\U0010ffff"
"""Sorts after every character a key may hold: [prefix, prefix + this) is the prefix's range
(a range, not LIKE: no escaping of % and _, and the primary key's index serves it)."""


class OutboxError(PumpgwError):
    """The outbox cannot do what was asked; the message says what to check."""


class OutboxFullError(OutboxError):
    """No room for more records: the limit or the disk (`disk`). Nothing was written."""

    def __init__(self, message: str, *, disk: bool = False) -> None:
        super().__init__(message)
        self.disk = disk


def _owner_only(path: Path, *, create: bool = True) -> None:
    """Create the file readable and writable by its owner only, whatever the umask; tighten
    a file an older version left open to others (it holds every reading)."""
    if create and not path.exists():
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    with contextlib.suppress(OSError):  # best effort: not ours to change (`pumpgw history`)
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def _damaged(path: Path, problem: str) -> str:
    return (
        f"the outbox at {path} is damaged ({problem[:300]}); the gateway does not start on a "
        "damaged outbox. Stop here, keep a copy, and either recover what it holds "
        f"(sqlite3 {path} .recover | sqlite3 recovered.db, then point store.path at it) or "
        "move it aside to start with an empty one (records not yet delivered stay in the "
        "copy); docs/outbox.md"
    )


def _row(r: tuple[int, str, str, str | None, bytes, bytes | None, int, float]) -> StoredRecord:
    return StoredRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7])


class Outbox:
    """SQLite outbox with one cursor per sink; thread-safe."""

    def __init__(
        self,
        path: Path,
        sinks: Sequence[str],
        *,
        durability: Literal["full", "normal"] = "full",
        max_pending: int = 1_000_000,
        retention_s: float = 7 * 86400,
        min_free_bytes: int = 0,
    ) -> None:
        self.path = path
        self.max_pending = max_pending
        self.retention_s = retention_s
        self.min_free_bytes = min_free_bytes
        self.disk_low = False
        """Below min_free_bytes free, until twice that is free again."""
        self.freed_rows = 0
        """Delivered rows deleted before their retention ended to make room on the disk."""
        self._lock = threading.Lock()
        self._db = self._open(path, durability)
        self._cursors = self._load_cursors(sinks)
        self._unwritten: dict[str, int] = {}
        self._cursors_written_m = time.monotonic()
        self._last_seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
        self._last_seq = max(self._last_seq, self._sequence_floor())

    @staticmethod
    def _open(path: Path, durability: str) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _owner_only(path)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # A new file gives freed pages back to the disk (free_space); an older one keeps
            # them for its own reuse, which is enough to resume after a full disk.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            db.executescript(SCHEMA)
            problems = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)").fetchall()]
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise OutboxError(
                    f"cannot open the outbox at {path}: {exc}; check the path in [store] "
                    "and that the directory is writable"
                ) from exc
            raise OutboxError(_damaged(path, str(exc))) from exc
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(
                f"cannot open the outbox at {path}: {exc}; check the path in [store] "
                "and that the directory is writable"
            ) from exc
        if problems != ["ok"]:
            db.close()
            raise OutboxError(_damaged(path, "; ".join(problems)))
        for suffix in ("-wal", "-shm"):  # SQLite made them like the database: make sure
            _owner_only(Path(f"{path}{suffix}"), create=False)
        return db

    def _sequence_floor(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
        return int(row[0]) if row else 0

    def _load_cursors(self, sinks: Sequence[str]) -> dict[str, int]:
        rows = dict(self._db.execute("SELECT sink, seq FROM cursors").fetchall())
        cursors = {sink: int(rows.get(sink, 0)) for sink in sinks}
        for sink, seq in cursors.items():
            self._db.execute("INSERT OR IGNORE INTO cursors (sink, seq) VALUES (?, ?)", (sink, seq))
        return cursors

    @property
    def sinks(self) -> tuple[str, ...]:
        return tuple(self._cursors)

    def pending(self) -> int:
        """Rows not yet delivered to the slowest sink."""
        low = min(self._cursors.values(), default=self._last_seq)
        return int(self._last_seq - low)

    def append(
        self, records: Sequence[OutRecord], state: Mapping[str, bytes | None] | None = None
    ) -> int:
        """Store records and state rows in one transaction (a None value deletes that row);
        return the last seq."""
        if not records and not state:
            return int(self._last_seq)
        with self._lock:
            self._check_room(records)
            try:
                return self._insert(records, state or {})
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if "full" in str(exc).lower():
                    self.disk_low = True
                    raise OutboxFullError(
                        f"the disk holding {self.path} is full: {exc}{self._free_now()}",
                        disk=True,
                    ) from exc
                raise OutboxError(f"cannot write the outbox at {self.path}: {exc}") from exc

    def _check_room(self, records: Sequence[OutRecord]) -> None:
        limit = self.max_pending
        priority = all(r.kind in PRIORITY_KINDS for r in records)
        if priority:
            limit += HEADROOM_ROWS
        elif shortfall := self._disk_shortfall(records):
            free, needed = shortfall
            raise OutboxFullError(
                f"the disk holding {self.path} is nearly full ({free // 1024} KiB free, "
                f"{needed // 1024} KiB needed: store.min_free_disk_kb = "
                f"{self.min_free_bytes // 1024}, doubled until reading resumes, and room for "
                "the batch); delivered rows are deleted as the sinks catch up; free space on "
                "that disk",
                disk=True,
            )
        if self.pending() + len(records) > limit:
            raise OutboxFullError(
                f"{self.pending()} records wait for delivery (limit {self.max_pending}); "
                "a sink is down or too slow"
            )

    def _insert(self, records: Sequence[OutRecord], state: Mapping[str, bytes | None]) -> int:
        now_s = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO records (kind, record_id, pump_id, payload, line, retain, stored_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.kind, r.record_id, r.pump_id, r.payload, r.line, r.retain, now_s) for r in records],
        )
        db.executemany(
            "INSERT INTO state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(key, value) for key, value in state.items() if value is not None],
        )
        db.executemany(
            "DELETE FROM state WHERE key = ?",
            [(key,) for key, value in state.items() if value is None],
        )
        self._update_cursors()
        last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
        db.execute("COMMIT")
        self._cursors_written()
        self._last_seq = int(last)
        return int(self._last_seq)

    def read(self, sink: str, after_seq: int, limit: int) -> list[StoredRecord]:
        """Rows after `after_seq`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (after_seq, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def read_lines(self, sink: str, after_seq: int, limit: int) -> list[StoredRecord]:
        """Like read, with empty payloads: half the cost per row for the InfluxDB sink."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {LINE_COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (after_seq, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def cursor(self, sink: str) -> int:
        return self._cursors[sink]

    def ack(self, sink: str, up_to_seq: int) -> None:
        """Advance a sink's cursor: every row up to `up_to_seq` is delivered (see the docstring)."""
        with self._lock:
            if up_to_seq <= self._cursors[sink]:
                return
            self._cursors[sink] = self._unwritten[sink] = up_to_seq
            if time.monotonic() - self._cursors_written_m >= CURSOR_WRITE_EVERY_S:
                # Best effort: on failure the cursor stays unwritten and goes with the
                # next commit, whose own error the service reports.
                with contextlib.suppress(OutboxError):
                    self._write_cursors()

    def _write_cursors(self) -> None:
        """Write moved cursors in a transaction of their own (the lock is held)."""
        if not self._unwritten:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._update_cursors()
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise OutboxError(f"cannot write the sink cursors at {self.path}: {exc}") from exc
        self._cursors_written()

    def _update_cursors(self) -> None:
        """Write moved cursors inside the caller's open transaction (the lock is held)."""
        if self._unwritten:
            self._db.executemany(
                "UPDATE cursors SET seq = ? WHERE sink = ?",
                [(seq, sink) for sink, seq in self._unwritten.items()],
            )

    def _cursors_written(self) -> None:
        """The transaction that carried the cursors committed."""
        self._unwritten.clear()
        self._cursors_written_m = time.monotonic()

    def backlog(self, sink: str) -> tuple[int, float | None]:
        """Rows this sink has not delivered, and when the oldest was stored (epoch s)."""
        cursor = self._cursors[sink]
        if cursor >= self._last_seq:
            return 0, None
        with self._lock:
            row = self._db.execute(
                "SELECT stored_at FROM records WHERE seq > ? ORDER BY seq LIMIT 1", (cursor,)
            ).fetchone()
        return self._last_seq - cursor, (float(row[0]) if row else None)

    def compact(self, now_s: float) -> int:
        """Delete rows every sink delivered that are older than the retention window."""
        return self._delete_delivered(now_s - self.retention_s)

    def free_disk_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the outbox's filesystem; -1 if the
        filesystem cannot say."""
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return -1
        return stat.f_bavail * stat.f_frsize

    def _disk_shortfall(self, records: Sequence[OutRecord]) -> tuple[int, int] | None:
        """(free, needed) bytes when these rows do not fit, even after delivered history made
        way for them; None when they fit."""
        batch_bytes = sum(len(r.payload) + len(r.line or b"") for r in records)
        if self._disk_need(batch_bytes) is None:
            return None
        with contextlib.suppress(OutboxError):  # the caller reports the full disk
            self._free_locked()
        return self._disk_need(batch_bytes)

    def _disk_need(self, batch_bytes: int) -> tuple[int, int] | None:
        """(free, needed) if the batch would leave less than the floor free. Once it would,
        the floor counts twice until that much is free again (no flapping). A row costs
        about twice its bytes on disk (the write-ahead log, then the database file)."""
        free = self.free_disk_bytes()
        if self.min_free_bytes <= 0 or free < 0:
            return None
        needed = (2 if self.disk_low else 1) * self.min_free_bytes + 2 * batch_bytes
        self.disk_low = free < needed
        return (free, needed) if self.disk_low else None

    def _free_now(self) -> str:
        """Free what delivered history can give (the lock is held); what failed, if it did."""
        try:
            self._free_locked()
        except OutboxError as exc:
            return f"; {exc}"
        return ""

    def free_space(self) -> int:
        """On a full disk: delete every delivered row, whatever its age (see _free_locked)."""
        with self._lock:
            return self._free_locked()

    def _free_locked(self) -> int:
        """Delete delivered rows a chunk at a time, handing pages and write-ahead log back to
        the filesystem after each chunk (one big delete would need more log than a full disk
        has). Returns the rows deleted; the lock is held."""
        low = min(self._cursors.values(), default=self._last_seq)
        deleted = 0
        try:
            self._write_cursors()
            while True:
                chunk = self._db.execute(
                    "DELETE FROM records WHERE seq IN "
                    "(SELECT seq FROM records WHERE seq <= ? ORDER BY seq LIMIT ?)",
                    (low, FREE_SPACE_CHUNK_ROWS),
                ).rowcount
                if chunk == 0:
                    return deleted
                self._db.executescript("PRAGMA incremental_vacuum;")  # every free page
                # RESTART, not TRUNCATE: the log keeps the space it will need again
                self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                deleted += chunk
                self.freed_rows += chunk
                if chunk < FREE_SPACE_CHUNK_ROWS:
                    return deleted
        except (sqlite3.Error, OutboxError) as exc:
            raise OutboxError(
                f"cannot free space in {self.path} ({deleted} delivered rows deleted): {exc}"
            ) from exc

    def _delete_delivered(self, stored_before_s: float) -> int:
        low = min(self._cursors.values(), default=self._last_seq)
        with self._lock:
            self._write_cursors()
            try:
                deleted = self._db.execute(
                    "DELETE FROM records WHERE seq <= ? AND stored_at < ?", (low, stored_before_s)
                ).rowcount
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot delete delivered rows in {self.path}: {exc}") from exc
        return int(deleted)

    def history(self, pump_id: str, limit: int) -> list[StoredRecord]:
        """A pump's most recent records, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM records WHERE pump_id = ? ORDER BY seq DESC LIMIT ?",  # noqa: S608
                (pump_id, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def recent_record_ids(self, limit: int) -> list[str]:
        """Identities of the newest device records, oldest first (to seed duplicate detection)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT record_id FROM (SELECT seq, record_id FROM records "
                "WHERE kind IN ('reading', 'info', 'event') ORDER BY seq DESC LIMIT ?) "
                "ORDER BY seq",
                (limit,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def load_states(self, prefix: str) -> dict[str, bytes]:
        """Every state row whose key starts with `prefix` (no pattern characters)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM state WHERE key >= ? AND key < ?",
                (prefix, prefix + STATE_KEY_END),
            ).fetchall()
        return {str(key): bytes(value) for key, value in rows}

    def close(self) -> None:
        """Write moved cursors and close the database."""
        with self._lock:
            try:
                self._write_cursors()
            finally:
                self._db.close()
