"""A durable, bounded FIFO of outgoing MQTT messages (events, command results), kept in SQLite.

paho-mqtt keeps nothing on disk, so what must survive a broker outage or an agent restart waits
here until the broker has acknowledged it. One Spool owns its file: it keeps the message count
and byte total in memory, so two Spool objects must never write the same path at once.

Bounds (count, payload bytes, age) are enforced by dropping the oldest messages; how many were
dropped is persisted in the database and reported by dropped(). A file that is not a readable
SQLite database is moved aside and replaced by an empty spool; `recovered_from` then names where
the old file went (the messages it held are lost, and not counted in dropped()).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0);
"""


@dataclass(frozen=True)
class SpooledMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    created: float  # wall-clock time (time.time()) of the put


class Spool:
    """Messages waiting for the broker, oldest first; thread-safe, durable across restarts."""

    def __init__(self, path: Path, max_messages: int = 10000, max_bytes: int = 16 << 20,
                 max_age_s: float = 7 * 86400):
        if max_messages < 1 or max_bytes < 1 or not max_age_s > 0:
            raise ValueError(f"spool bounds must be positive, got max_messages={max_messages}, "
                             f"max_bytes={max_bytes}, max_age_s={max_age_s}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.recovered_from: Path | None = None
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.OperationalError:
            raise  # cannot open or lock the file (permissions, a directory, ...): nothing says it is corrupt
        except sqlite3.DatabaseError:  # not a database, or a malformed one
            self.recovered_from = self._move_aside()
            self._db = self._open()
        with self._lock:
            self._enforce_bounds()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError(f"{self.path}: failed its integrity check")
            db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode, NORMAL survives a crash of the agent; only a power cut may lose the last puts.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._count, self._bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages").fetchone()
            self._dropped = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0]
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        suffix = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{suffix}")
            suffix += 1
        self.path.rename(target)
        for journal in ("-wal", "-shm", "-journal"):  # they belong to the old file, never to the new one
            companion = self.path.with_name(self.path.name + journal)
            if companion.exists():
                companion.rename(target.with_name(target.name + journal))
        return target

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ the queue

    def put(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Append a message; returns its id. Drops the oldest messages if a bound is now exceeded."""
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty string, got {topic!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        payload = bytes(payload)
        if len(payload) > self.max_bytes:
            raise ValueError(f"a {len(payload)}-byte payload can never fit a spool bounded to {self.max_bytes} bytes")
        with self._lock:
            self._check_open()
            with self._transaction() as db:
                cursor = db.execute("INSERT INTO messages (topic, payload, qos, created) VALUES (?, ?, ?, ?)",
                                    (topic, payload, qos, time.time()))
                totals = self._drop_excess(db, self._count + 1, self._bytes + len(payload))
            self._count, self._bytes, self._dropped = totals
            return int(cursor.lastrowid)

    def pending(self, limit: int = 100) -> list[SpooledMessage]:
        """Up to `limit` messages, oldest first: the order to replay them in."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        with self._lock:
            self._check_open()
            self._enforce_bounds()  # a spool left offline past max_age_s must not replay stale messages
            rows = self._db.execute("SELECT id, topic, payload, qos, created FROM messages ORDER BY id LIMIT ?",
                                    (limit,)).fetchall()
        return [SpooledMessage(id, topic, bytes(payload), qos, created) for id, topic, payload, qos, created in rows]

    def ack(self, message_id: int) -> None:
        """The broker has the message: remove it. Acknowledging an id that is gone does nothing."""
        with self._lock:
            self._check_open()
            with self._transaction() as db:
                row = db.execute("SELECT LENGTH(payload) FROM messages WHERE id = ?", (message_id,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if row is not None:
                self._count -= 1
                self._bytes -= row[0]

    def dropped(self) -> int:
        """How many messages the bounds have dropped since the spool file was created."""
        with self._lock:
            return self._dropped

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ bounds

    def _check_open(self) -> None:
        if self._db is None:
            raise RuntimeError(f"{self.path}: the spool is closed")

    def _enforce_bounds(self) -> None:
        with self._transaction() as db:
            totals = self._drop_excess(db, self._count, self._bytes)
        self._count, self._bytes, self._dropped = totals

    def _drop_excess(self, db: sqlite3.Connection, count: int, size: int) -> tuple[int, int, int]:
        """Inside a transaction: drop the oldest messages until every bound holds.

        Returns the new (count, bytes, dropped) totals, to be kept only once the transaction commits.
        """
        doomed = dict(db.execute("SELECT id, LENGTH(payload) FROM messages WHERE created < ?",
                                 (time.time() - self.max_age_s,)).fetchall())
        count -= len(doomed)
        size -= sum(doomed.values())
        oldest_first = db.execute("SELECT id, LENGTH(payload) FROM messages ORDER BY id")
        try:
            for id, length in oldest_first:
                if count <= self.max_messages and size <= self.max_bytes:
                    break
                if id not in doomed:
                    doomed[id] = length
                    count -= 1
                    size -= length
        finally:
            oldest_first.close()
        if doomed:
            db.executemany("DELETE FROM messages WHERE id = ?", [(id,) for id in doomed])
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (len(doomed),))
        return count, size, self._dropped + len(doomed)
