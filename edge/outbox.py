"""The station's durable outbox: every result and event is in SQLite before it is sent, gone only when acked.

One SQLite file per station (stdlib `sqlite3`: a station-local queue, not the central store). The outbox
assigns each result its identity:

- `station_id`: given by the station;
- `epoch`: one per boot. Opening the outbox commits `epoch = previous + 1` before anything is written, so
  a restart can never reuse an (epoch, seq) pair and a wall clock that jumps backwards cannot reorder or
  collide anything: no identity or ordering depends on the clock. A brand-new file starts at
  `int(clock())` rather than 1, so a station whose outbox file was lost or replaced does not restart at an
  epoch the collector already holds (which it would take for duplicates and drop);
- `seq`: 1, 2, 3, ... within the epoch, assigned in the same transaction as the insert (contiguous; the only
  gaps are the counted drops below).

Durability: WAL mode with `synchronous=FULL` by default. In WAL mode NORMAL survives a process crash
(SIGKILL) but may lose the last commits on a power cut, and a lost commit of the epoch bump would let the
next boot reuse an epoch the collector already has: its results would be taken for duplicates. A station
writes tens of results per second, so one WAL fsync per result (about a millisecond on an SSD, see
BENCHMARKS.md) is cheap insurance.

Bounds and the full-outbox policy (RELIABILITY.md quotes this):
  The outbox holds at most `max_rows` results and `max_bytes` bytes of stored frames. When an insert would
  exceed either bound, results are dropped from the outbox in this order until it fits: OK results first
  (oldest first), then ERROR results (oldest first), then NOK results (oldest first). The new result takes
  part like any other, so a new OK result is dropped at once when only NOK and ERROR results are stored,
  and NOK results are kept over OK and ERROR ones. Every drop is counted per decision in the outbox file
  (`dropped_ok`, `dropped_error`, `dropped_nok`; they survive restarts), given by `Outbox.stats()` and
  `Uplink.stats()` for /metrics and sent in every heartbeat (`dropped`). A dropped result keeps its seq,
  so the collector sees the gap.
  A full disk is handled by the same policy, never by crashing. Before each insert the outbox checks the
  filesystem (statvfs): if the new result does not fit in pages freed inside the file while leaving
  `min_free_bytes` free, older results are dropped in policy order (never one above the new result's
  priority) until it does; when nothing may be dropped, the new result itself is dropped. The headroom is
  needed because in WAL mode even a DELETE writes, and a checkpoint must be able to grow the file: a disk
  run all the way to ENOSPC can end where no deletion fits any more (the 1 MiB tmpfs test showed it).
  If SQLite still reports `database or disk is full` (another process filled the disk, or the quota
  below), the transaction is rolled back, the WAL checkpointed, one result dropped by the same rule and
  the insert retried. Drops for lack of space are also counted as `dropped_disk_full`.
  `disk_quota_bytes` emulates a small disk inside SQLite (`PRAGMA max_page_count`: the database file cannot
  grow past it and SQLite raises exactly that error); the tests also run against a real 1 MiB tmpfs where
  the machine allows mounting one.

Results that the collector refuses as malformed (`ErrorReply` bad_message or too_large) move to the
`dead_letter` table (counted) instead of being resent forever.

Thread safety: one connection guarded by a lock; the station's scoring thread calls `add_result` while the
uplink's I/O thread calls `pending_results` / `ack`. One process per outbox file (an flock on PATH.lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from protocol.frames import DEFAULT_LIMITS, Limits, ProtocolError, decode, encode
from protocol.messages import InspectionResult, StationEvent

__all__ = [
    "DROP_ORDER",
    "Outbox",
    "OutboxBusyError",
    "OutboxLimits",
    "OutboxStats",
    "Pending",
]

log = logging.getLogger("m3dm.outbox")

# Lower priority is dropped first when the outbox is full: OK, then ERROR, then NOK.
_PRIORITY = {"OK": 0, "ERROR": 1, "NOK": 2}
DROP_ORDER: tuple[str, ...] = ("OK", "ERROR", "NOK")
_DROP_COUNTERS = ("dropped_ok", "dropped_error", "dropped_nok", "dropped_disk_full", "dead_letters")
_DISK_FULL_RETRIES = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY, next_seq INTEGER NOT NULL, opened_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    decision TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    created_ts REAL NOT NULL,
    header BLOB NOT NULL,
    blobs BLOB NOT NULL,
    UNIQUE (epoch, seq)
);
CREATE INDEX IF NOT EXISTS results_drop_order ON results (priority, epoch, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    created_ts REAL NOT NULL,
    header BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    epoch INTEGER,
    seq INTEGER,
    event_id TEXT,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    ts REAL NOT NULL,
    header BLOB NOT NULL,
    blobs BLOB NOT NULL
);
"""

_blobs_encoder = msgspec.msgpack.Encoder()
_blobs_decoder = msgspec.msgpack.Decoder(list[bytes])


class OutboxBusyError(RuntimeError):
    """Another process holds this outbox file (two stations must never share one)."""


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds of the outbox. `disk_quota_bytes` (None: off) emulates a small disk (see module doc)."""

    max_rows: int = 200_000
    max_bytes: int = 1024 * 1024 * 1024
    max_events: int = 10_000
    disk_quota_bytes: int | None = None
    # Free space kept on the outbox's filesystem (statvfs) by the same drop policy. SQLite needs it: in WAL
    # mode even a DELETE writes, and a checkpoint must be able to grow the database file, so a disk run
    # to ENOSPC can be left where no deletion fits any more. 0: rely on SQLITE_FULL alone.
    min_free_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class Pending:
    """A stored message ready to go on the wire. kind "result" has epoch/seq; kind "event" has event_id."""

    kind: str
    frames: list[bytes]
    epoch: int = 0
    seq: int = 0
    event_id: str = ""

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.seq)


@dataclass(frozen=True)
class OutboxStats:
    """A snapshot for metrics and heartbeats."""

    station_id: str
    epoch: int
    last_seq: int  # highest seq assigned in this epoch (0: none yet)
    depth: int  # results waiting for an ack
    events: int  # events waiting for an ack
    stored_bytes: int
    dropped: dict[str, int]  # dropped_ok, dropped_error, dropped_nok, dropped_disk_full, dead_letters

    @property
    def dropped_total(self) -> int:
        """Results the collector will never get: policy drops (any decision) plus dead letters."""
        d = self.dropped
        return d["dropped_ok"] + d["dropped_error"] + d["dropped_nok"] + d["dead_letters"]


def _is_disk_full(err: sqlite3.OperationalError) -> bool:
    return getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(err).lower()


class Outbox:
    """Durable, bounded, ordered store of unacked results and events for one station.

    Opening it starts a new epoch (see module doc). Every method is thread-safe.
    """

    def __init__(
        self,
        path: str | Path,
        station_id: str,
        limits: OutboxLimits = OutboxLimits(),
        clock: Callable[[], float] = time.time,
        synchronous: str = "FULL",
        wire_limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self.station_id = station_id
        self.limits = limits
        self.wire_limits = wire_limits
        self._clock = clock
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_file_lock()
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._configure(synchronous)
            self.epoch = self._open_epoch()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._next_seq = 1
        self._rows, self._bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(nbytes), 0) FROM results"
        ).fetchone()
        self._counters = self._load_counters()
        self._unsaved_disk_full = 0  # drops counted while even the counter could not be written
        self._closed = False
        log.info(
            "outbox %s station=%s epoch=%d: %d result(s) waiting from earlier epochs",
            self.path,
            station_id,
            self.epoch,
            self._rows,
        )

    # --- opening -------------------------------------------------------------------------------------

    def _take_file_lock(self) -> int:
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutboxBusyError(f"{self.path} is in use by another process") from None
        return fd

    def _configure(self, synchronous: str) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=5000")
        # A small, reused WAL: after a RESTART checkpoint the next transaction overwrites the WAL from its
        # start, so on a full disk the deletions that make room need no new blocks.
        self._db.execute("PRAGMA wal_autocheckpoint=64")
        self._db.execute("PRAGMA journal_size_limit=2097152")
        self._db.executescript(_SCHEMA)
        if self.limits.disk_quota_bytes is not None:
            page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
            pages = max(self.limits.disk_quota_bytes // page_size, 8)
            used = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count={max(pages, used)}")

    def _open_epoch(self) -> int:
        with self._tx():
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            sid = self._db.execute("SELECT value FROM meta WHERE key='station_id_hash'").fetchone()
            epoch = int(self._clock()) if row is None else int(row[0]) + 1
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (epoch,))
            self._db.execute(
                "INSERT INTO epochs (epoch, next_seq, opened_ts) VALUES (?, 1, ?)", (epoch, self._clock())
            )
            if sid is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('station_id_hash', ?)", (_sid_hash(self.station_id),)
                )
            elif int(sid[0]) != _sid_hash(self.station_id):
                raise ValueError(f"{self.path} belongs to another station id than {self.station_id!r}")
        return epoch

    def _load_counters(self) -> dict[str, int]:
        counters = dict.fromkeys(_DROP_COUNTERS, 0)
        for key, value in self._db.execute("SELECT key, value FROM meta"):
            if key in counters:
                counters[key] = int(value)
        return counters

    # --- writing -------------------------------------------------------------------------------------

    def add_result(
        self, result: InspectionResult | Mapping[str, Any], blobs: Sequence[bytes] = ()
    ) -> tuple[int, int]:
        """Store one result and return its (epoch, seq); it is durable when this returns.

        `result`: an InspectionResult whose station_id/epoch/seq are ignored (replaced here), or a mapping
        of every other InspectionResult field. `blobs`: the binary frames its Blob references point at
        (1-based). A result that would not pass the collector's decoder raises ValueError and nothing is
        stored. When the outbox is full the policy in the module doc applies; the result still gets a seq.
        """
        with self._lock:
            self._check_open()
            seq = self._next_seq
            message = self._identified(result, seq)
            frames = [bytes(f) for f in encode(message, list(blobs))]
            try:
                decode(frames, InspectionResult, self.wire_limits)
            except ProtocolError as err:
                raise ValueError(f"result would be refused by the collector: {err}") from None
            self._next_seq += 1
            self._insert_result(message.decision, seq, frames)
            return self.epoch, seq

    def _identified(self, result: InspectionResult | Mapping[str, Any], seq: int) -> InspectionResult:
        ident = {"station_id": self.station_id, "epoch": self.epoch, "seq": seq}
        if isinstance(result, InspectionResult):
            return msgspec.structs.replace(result, **ident)
        fields = {k: v for k, v in result.items() if k not in ident}
        try:
            return InspectionResult(**fields, **ident)
        except TypeError as err:
            raise ValueError(f"bad result fields: {err}") from None

    def _insert_result(self, decision: str, seq: int, frames: list[bytes]) -> None:
        priority = _PRIORITY[decision]
        nbytes = sum(len(f) for f in frames)
        row = (
            self.epoch,
            seq,
            priority,
            decision,
            nbytes,
            self._clock(),
            frames[0],
            _blobs_encoder.encode(frames[1:]),
        )
        if not self._room_for(priority, nbytes):
            self._count_drop(decision, disk_full=True)
            log.warning(
                "outbox %s: dropped new %s result seq %d (disk full, nothing lower to drop)",
                self.path,
                decision,
                seq,
            )
            return
        for _attempt in range(_DISK_FULL_RETRIES):
            counters_before = dict(self._counters)
            try:
                with self._tx():
                    self._db.execute(
                        "INSERT INTO results (epoch, seq, priority, decision, nbytes, created_ts, header,"
                        " blobs) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    self._rows += 1
                    self._bytes += nbytes
                    self._db.execute("UPDATE epochs SET next_seq=? WHERE epoch=?", (seq + 1, self.epoch))
                    self._enforce_bounds()
                    self._save_counters()
                return
            except sqlite3.OperationalError as err:
                # The transaction rolled back: recount what is really stored, undo its drop counts.
                self._reload_sizes()
                self._counters = counters_before
                if not _is_disk_full(err):
                    raise
                log.warning(
                    "outbox %s: disk full at seq %d (%s): applying the drop policy", self.path, seq, decision
                )
                if not self._free_space_for(priority):
                    break
        self._count_drop(decision, disk_full=True)
        log.warning(
            "outbox %s: dropped new %s result seq %d (disk full, nothing lower to drop)",
            self.path,
            decision,
            seq,
        )

    def _enforce_bounds(self) -> None:
        """Inside the insert transaction: drop by policy until both bounds hold (the new row included)."""
        while self._rows > self.limits.max_rows or self._bytes > self.limits.max_bytes:
            victim = self._db.execute(
                "SELECT id, seq, decision, nbytes FROM results ORDER BY priority, epoch, seq LIMIT 1"
            ).fetchone()
            if victim is None:
                return
            self._drop_row(victim)

    def _drop_row(self, victim: tuple[int, int, str, int]) -> None:
        row_id, seq, decision, nbytes = victim
        self._db.execute("DELETE FROM results WHERE id=?", (row_id,))
        self._rows -= 1
        self._bytes -= nbytes
        self._counters[f"dropped_{decision.lower()}"] += 1
        log.warning(
            "outbox %s: full, dropped %s result seq %d (policy OK < ERROR < NOK)", self.path, decision, seq
        )

    def _free_space_for(self, priority: int) -> bool:
        """Disk full: checkpoint, then drop the lowest older result not above `priority`. False: none."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.OperationalError:
            pass
        counters_before = dict(self._counters)
        try:
            with self._tx():
                victim = self._db.execute(
                    "SELECT id, seq, decision, nbytes FROM results WHERE priority <= ?"
                    " ORDER BY priority, epoch, seq LIMIT 1",
                    (priority,),
                ).fetchone()
                if victim is None:
                    return False
                self._drop_row(victim)
                self._counters["dropped_disk_full"] += 1
                self._save_counters()
        except sqlite3.OperationalError as err:
            self._reload_sizes()
            self._counters = counters_before
            log.warning("outbox %s: cannot even drop a result on a full disk: %s", self.path, err)
            return False
        return True

    def _room_for(self, priority: int, nbytes: int) -> bool:
        """Keep `min_free_bytes` free on the filesystem, dropping by policy; False: drop the new result."""
        if self.limits.min_free_bytes <= 0:
            return True
        while True:
            fs = os.statvfs(self.path.parent)
            page = self._db.execute("PRAGMA page_size").fetchone()[0]
            reusable = self._db.execute("PRAGMA freelist_count").fetchone()[0] * page
            growth = max(nbytes + 8 * page - reusable, 0)
            # Fits in pages freed inside the file, or leaves the headroom free: no drop needed.
            if growth == 0 or fs.f_bavail * fs.f_frsize - growth >= self.limits.min_free_bytes:
                return True
            log.warning("outbox %s: filesystem nearly full: applying the drop policy", self.path)
            if not self._free_space_for(priority):
                return False

    def _count_drop(self, decision: str, disk_full: bool) -> None:
        self._counters[f"dropped_{decision.lower()}"] += 1
        if disk_full:
            self._counters["dropped_disk_full"] += 1
        try:
            with self._tx():
                self._save_counters()
        except sqlite3.OperationalError:
            # Still counted in memory (metrics, heartbeats); written with the next successful transaction.
            pass

    def _save_counters(self) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(self._counters.items()))

    def _reload_sizes(self) -> None:
        self._rows, self._bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(nbytes), 0) FROM results"
        ).fetchone()

    def add_event(
        self,
        kind: str,
        detail: Mapping[str, str] | None = None,
        bundle_id: str = "",
        bundle_version: str = "",
        event_id: str | None = None,
    ) -> str:
        """Store a StationEvent (idempotent by `event_id`, a fresh uuid4 hex if None); returns the event_id.

        Events beyond `max_events` drop the oldest event (counted as dead letters are not: events are
        status, results are the product). A full disk drops the event with a warning; it never raises.
        """
        with self._lock:
            self._check_open()
            event_id = event_id or uuid.uuid4().hex
            event = StationEvent(
                station_id=self.station_id,
                epoch=self.epoch,
                event_id=event_id,
                ts=self._clock(),
                kind=kind,
                bundle_id=bundle_id,
                bundle_version=bundle_version,
                detail=dict(detail or {}),
            )
            header = bytes(encode(event)[0])
            try:
                with self._tx():
                    self._db.execute(
                        "INSERT OR IGNORE INTO events (event_id, created_ts, header) VALUES (?, ?, ?)",
                        (event_id, self._clock(), header),
                    )
                    self._db.execute(
                        "DELETE FROM events WHERE id NOT IN (SELECT id FROM events ORDER BY id DESC LIMIT ?)",
                        (self.limits.max_events,),
                    )
            except sqlite3.OperationalError as err:
                if not _is_disk_full(err):
                    raise
                log.warning("outbox %s: event %s (%s) not stored: disk full", self.path, event_id, kind)
            return event_id

    # --- reading and acking --------------------------------------------------------------------------

    def pending_results(self, after: tuple[int, int] | None = None, limit: int = 256) -> list[Pending]:
        """Unacked results in (epoch, seq) order, strictly after `after` (None: from the oldest)."""
        epoch, seq = after if after is not None else (-1, -1)
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT epoch, seq, header, blobs FROM results WHERE (epoch, seq) > (?, ?)"
                " ORDER BY epoch, seq LIMIT ?",
                (epoch, seq, limit),
            ).fetchall()
        return [Pending("result", [h, *_blobs_decoder.decode(b)], epoch=e, seq=s) for e, s, h, b in rows]

    def pending_events(self, exclude: Iterable[str] = (), limit: int = 64) -> list[Pending]:
        """Unacked events, oldest first, except those in `exclude` (already in flight)."""
        skip = set(exclude)
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT event_id, header FROM events ORDER BY id LIMIT ?", (limit + len(skip),)
            ).fetchall()
        return [Pending("event", [h], event_id=e) for e, h in rows if e not in skip][:limit]

    def ack(self, epoch: int, upto_seq: int, seqs: Iterable[int] = (), event_ids: Iterable[str] = ()) -> int:
        """Delete what the collector stored: results of `epoch` with seq <= upto_seq or in `seqs`, and the
        events in `event_ids`. Returns how many results were deleted (acks of unknown ids are no-ops)."""
        seq_list = [int(s) for s in seqs]
        ids = [str(e) for e in event_ids]
        with self._lock:
            self._check_open()
            with self._tx():
                deleted = self._db.execute(
                    "DELETE FROM results WHERE epoch=? AND seq<=? RETURNING nbytes", (epoch, upto_seq)
                ).fetchall()
                for i in range(0, len(seq_list), 500):
                    chunk = seq_list[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    deleted += self._db.execute(
                        f"DELETE FROM results WHERE epoch=? AND seq IN ({marks}) RETURNING nbytes",
                        (epoch, *chunk),
                    ).fetchall()
                if ids:
                    self._db.executemany("DELETE FROM events WHERE event_id=?", [(e,) for e in ids])
            self._rows -= len(deleted)
            self._bytes -= sum(n for (n,) in deleted)
            return len(deleted)

    def dead_letter(self, epoch: int, seq: int, code: str, reason: str) -> bool:
        """Move a result the collector refused for good (bad_message, too_large) out of the send queue."""
        with self._lock:
            self._check_open()
            with self._tx():
                row = self._db.execute(
                    "SELECT id, nbytes, header, blobs FROM results WHERE epoch=? AND seq=?", (epoch, seq)
                ).fetchone()
                if row is None:
                    return False
                row_id, nbytes, header, blobs = row
                self._db.execute(
                    "INSERT INTO dead_letter (kind, epoch, seq, code, reason, ts, header, blobs)"
                    " VALUES ('result', ?, ?, ?, ?, ?, ?, ?)",
                    (epoch, seq, code, reason[:2000], self._clock(), header, blobs),
                )
                self._db.execute("DELETE FROM results WHERE id=?", (row_id,))
                self._counters["dead_letters"] += 1
                self._save_counters()
            self._rows -= 1
            self._bytes -= nbytes
        log.error(
            "outbox %s: result epoch %d seq %d dead-lettered: %s: %s", self.path, epoch, seq, code, reason
        )
        return True

    def dead_letter_event(self, event_id: str, code: str, reason: str) -> bool:
        """Like `dead_letter`, for a refused event."""
        with self._lock:
            self._check_open()
            with self._tx():
                row = self._db.execute(
                    "SELECT id, header FROM events WHERE event_id=?", (event_id,)
                ).fetchone()
                if row is None:
                    return False
                self._db.execute(
                    "INSERT INTO dead_letter (kind, event_id, code, reason, ts, header, blobs)"
                    " VALUES ('event', ?, ?, ?, ?, ?, ?)",
                    (event_id, code, reason[:2000], self._clock(), row[1], b""),
                )
                self._db.execute("DELETE FROM events WHERE id=?", (row[0],))
        return True

    # --- state ---------------------------------------------------------------------------------------

    def newest_key(self) -> tuple[int, int] | None:
        """(epoch, seq) of the newest unacked result, None when the outbox is empty."""
        with self._lock:
            self._check_open()
            row = self._db.execute(
                "SELECT epoch, seq FROM results ORDER BY epoch DESC, seq DESC LIMIT 1"
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def depth(self) -> int:
        """Results waiting for an ack (all epochs)."""
        return self._rows

    def event_depth(self) -> int:
        with self._lock:
            self._check_open()
            return self._db.execute("SELECT count(*) FROM events").fetchone()[0]

    def drop_counts(self) -> dict[str, int]:
        """The all-time drop counters (`OutboxStats.dropped`) without touching the database: /metrics reads
        them on every scrape, also after `close` (the last values stay)."""
        with self._lock:
            return dict(self._counters)

    def stats(self) -> OutboxStats:
        with self._lock:
            dropped = dict(self._counters)
            return OutboxStats(
                station_id=self.station_id,
                epoch=self.epoch,
                last_seq=self._next_seq - 1,
                depth=self._rows,
                events=self.event_depth(),
                stored_bytes=self._bytes,
                dropped=dropped,
            )

    def close(self) -> None:
        """Close the database and release the file lock (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            finally:
                os.close(self._lock_fd)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"outbox {self.path} is closed")

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.OperationalError:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL)


def _sid_hash(station_id: str) -> int:
    """A stable 63-bit hash of the station id (an outbox file belongs to one station)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(station_id.encode()).digest()[:8], "big") >> 1
