"""Durable hub state: the queue of accepted updates and the global versions.

SQLite holds the metadata (WAL, synchronous=FULL); the frames themselves are files written with
write-to-temp, fsync, rename, fsync-directory. An update is durable before :meth:`accept_update`
returns, so the receipt that follows it is a promise the hub can keep after ``kill -9``. A version is
committed in one transaction together with marking the updates it consumed, so no update is counted
twice and the version never moves backwards.

:class:`HubStore` is the one persistence contract; :class:`SqliteStore` is the durable backend and
:class:`MemoryStore` an in-memory one with the same semantics (for tests). Both are checked by the
same contract suite (``tests/test_store_contract.py``). Unknown ids: ``get_*`` return ``None``,
``load_*`` raise :class:`KeyError`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ffm_edge.fsutil import write_durably
from ffm_hub.faults import crash_point

__all__ = ["AcceptResult", "HubStore", "MemoryStore", "QueuedUpdate", "SqliteStore", "VersionRecord"]


@dataclass(frozen=True)
class QueuedUpdate:
    """Metadata of one accepted update."""

    update_id: str
    device: str
    base_version: int
    num_samples: int
    strategy: str
    codec: str
    size: int
    received_at: float
    status: str = "queued"
    aggregated_into: int | None = None


@dataclass(frozen=True)
class VersionRecord:
    """Metadata of one global version."""

    version: int
    parent: int | None
    sha256: str
    size: int
    created_at: float
    num_updates: int
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AcceptResult:
    """Outcome of :meth:`HubStore.accept_update`."""

    duplicate: bool
    queue_length: int


class HubStore(ABC):
    """Persistence interface of the hub (one contract, several backends)."""

    @abstractmethod
    def accept_update(self, update: QueuedUpdate, frame: bytes) -> AcceptResult:
        """Make an update durable; a second call with the same id is a duplicate and changes nothing.

        The stored record has ``size=len(frame)``, status ``queued`` and ``received_at`` from
        ``update`` (the current time when it is falsy); the first frame accepted for an id wins.
        """

    @abstractmethod
    def queued(self) -> list[QueuedUpdate]:
        """Accepted updates not yet aggregated, in arrival order."""

    @abstractmethod
    def get_update(self, update_id: str) -> QueuedUpdate | None:
        """Metadata of any accepted update, aggregated or not; None for an unknown id."""

    @abstractmethod
    def load_update(self, update_id: str) -> bytes:
        """The frame of an accepted update; :class:`KeyError` for an unknown id."""

    @abstractmethod
    def commit_version(
        self, record: VersionRecord, frame: bytes, consumed: Iterable[str], server_state: bytes | None = None
    ) -> None:
        """Store a new version and mark ``consumed`` updates aggregated, atomically.

        ``server_state`` is the server optimizer's buffers after this version (opaque bytes), committed
        in the same transaction so a restart resumes momentum with the version it belongs to.
        Raises :class:`ValueError` when ``record.version`` is not newer than the latest stored version,
        or when a consumed id is not queued (unknown, already aggregated, or listed twice); on any error
        nothing changes: no version row, no frame, no server state, no update consumed.
        """

    @abstractmethod
    def load_server_state(self, version: int) -> bytes | None:
        """The server optimizer state committed with ``version``; None when there was none (or pruned)."""

    @abstractmethod
    def latest_version(self) -> VersionRecord | None:
        """The newest global version, or None before the first."""

    @abstractmethod
    def get_version(self, version: int) -> VersionRecord | None:
        """Metadata of one version; None for an unknown (or pruned) version."""

    @abstractmethod
    def load_version(self, version: int) -> bytes:
        """The frame of one global version; :class:`KeyError` for an unknown (or pruned) version."""

    @abstractmethod
    def versions(self) -> list[VersionRecord]:
        """Every stored version, oldest first."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of updates per status (``queued``, ``aggregated``); statuses with none are absent."""

    @abstractmethod
    def prune_versions(self, keep: int) -> list[int]:
        """Delete every version but the newest ``keep`` (``keep >= 1``, so never the latest).

        Row and frame both go, even for a version that is the parent of a kept one; :meth:`versions`
        then lists only the kept ones. Updates keep their ``aggregated_into``. Returns the pruned
        version numbers, oldest first. :class:`ValueError` when ``keep < 1``.
        """

    @abstractmethod
    def close(self) -> None:
        """Release resources."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL UNIQUE,
    device TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    strategy TEXT NOT NULL,
    codec TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    aggregated_into INTEGER
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    parent INTEGER,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    num_updates INTEGER NOT NULL,
    kind TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS server_state (
    version INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
"""


class SqliteStore(HubStore):
    """SQLite metadata plus one file per frame under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._updates_dir = self.root / "updates"
        self._versions_dir = self.root / "versions"
        self._updates_dir.mkdir(parents=True, exist_ok=True)
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "hub.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._remove_orphans()

    def _update_path(self, update_id: str) -> Path:
        return self._updates_dir / f"{update_id}.ffmu"

    def _version_path(self, version: int) -> Path:
        return self._versions_dir / f"{version:010d}.ffmg"

    def _remove_orphans(self) -> None:
        """Drop files a crash left without a committed row (never receipted, so safe to drop)."""
        known_updates = {row[0] for row in self._db.execute("SELECT update_id FROM updates")}
        for path in self._updates_dir.iterdir():
            if path.suffix == ".tmp" or path.stem not in known_updates:
                path.unlink(missing_ok=True)
        known_versions = {row[0] for row in self._db.execute("SELECT version FROM versions")}
        for path in self._versions_dir.iterdir():
            if path.suffix == ".tmp" or not path.stem.isdigit() or int(path.stem) not in known_versions:
                path.unlink(missing_ok=True)

    def accept_update(self, update: QueuedUpdate, frame: bytes) -> AcceptResult:
        with self._lock:
            existing = self._db.execute("SELECT 1 FROM updates WHERE update_id = ?", (update.update_id,)).fetchone()
            if existing is None:
                write_durably(self._update_path(update.update_id), frame)
                self._db.execute(
                    "INSERT INTO updates (update_id, device, base_version, num_samples, strategy, codec, size,"
                    " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        update.update_id,
                        update.device,
                        update.base_version,
                        update.num_samples,
                        update.strategy,
                        update.codec,
                        len(frame),
                        update.received_at or time.time(),
                    ),
                )
            (length,) = self._db.execute("SELECT COUNT(*) FROM updates WHERE status = 'queued'").fetchone()
            return AcceptResult(duplicate=existing is not None, queue_length=int(length))

    @staticmethod
    def _update_row(row: tuple[Any, ...]) -> QueuedUpdate:
        return QueuedUpdate(*row)

    _UPDATE_COLUMNS = (
        "update_id, device, base_version, num_samples, strategy, codec, size, received_at, status, aggregated_into"
    )

    def queued(self) -> list[QueuedUpdate]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._UPDATE_COLUMNS} FROM updates WHERE status = 'queued' ORDER BY seq"
            ).fetchall()
        return [self._update_row(r) for r in rows]

    def get_update(self, update_id: str) -> QueuedUpdate | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._UPDATE_COLUMNS} FROM updates WHERE update_id = ?", (update_id,)
            ).fetchone()
        return None if row is None else self._update_row(row)

    def load_update(self, update_id: str) -> bytes:
        try:
            return self._update_path(update_id).read_bytes()
        except FileNotFoundError as exc:
            raise KeyError(update_id) from exc

    def commit_version(
        self, record: VersionRecord, frame: bytes, consumed: Iterable[str], server_state: bytes | None = None
    ) -> None:
        consumed = list(consumed)
        with self._lock:
            latest = self._db.execute("SELECT MAX(version) FROM versions").fetchone()[0]
            if latest is not None and record.version <= latest:
                raise ValueError(f"version {record.version} is not newer than stored version {latest}")
            write_durably(self._version_path(record.version), frame)
            crash_point("committing")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.version,
                        record.parent,
                        record.sha256,
                        record.size,
                        record.created_at,
                        record.num_updates,
                        record.kind,
                        json.dumps(record.metrics),
                    ),
                )
                for update_id in consumed:
                    cur = self._db.execute(
                        "UPDATE updates SET status = 'aggregated', aggregated_into = ?"
                        " WHERE update_id = ? AND status = 'queued'",
                        (record.version, update_id),
                    )
                    if cur.rowcount != 1:
                        raise ValueError(f"update {update_id} is not queued")
                if server_state is not None:
                    self._db.execute("INSERT INTO server_state VALUES (?, ?)", (record.version, server_state))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._version_path(record.version).unlink(missing_ok=True)
                raise

    @staticmethod
    def _version_row(row: tuple[Any, ...]) -> VersionRecord:
        version, parent, sha256, size, created_at, num_updates, kind, metrics = row
        return VersionRecord(version, parent, sha256, size, created_at, num_updates, kind, json.loads(metrics))

    def latest_version(self) -> VersionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else self._version_row(row)

    def get_version(self, version: int) -> VersionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        return None if row is None else self._version_row(row)

    def load_version(self, version: int) -> bytes:
        try:
            return self._version_path(version).read_bytes()
        except FileNotFoundError as exc:
            raise KeyError(version) from exc

    def load_server_state(self, version: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM server_state WHERE version = ?", (version,)).fetchone()
        return None if row is None else bytes(row[0])

    def versions(self) -> list[VersionRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM versions ORDER BY version").fetchall()
        return [self._version_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of updates per status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall()
        return {status: int(n) for status, n in rows}

    def prune_versions(self, keep: int) -> list[int]:
        _check_keep(keep)
        with self._lock:
            rows = self._db.execute(
                "SELECT version FROM versions ORDER BY version DESC LIMIT -1 OFFSET ?", (keep,)
            ).fetchall()
            pruned = sorted(int(row[0]) for row in rows)
            if not pruned:
                return []
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM versions WHERE version = ?", [(v,) for v in pruned])
                self._db.executemany("DELETE FROM server_state WHERE version = ?", [(v,) for v in pruned])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            # Files go after the commit: a crash in between leaves orphans that the next start removes.
            for v in pruned:
                self._version_path(v).unlink(missing_ok=True)
        return pruned

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _check_keep(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the latest version is never pruned), got {keep}")


class MemoryStore(HubStore):
    """In-memory backend with the semantics of :class:`SqliteStore` (nothing survives the process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._updates: dict[str, QueuedUpdate] = {}  # insertion order is arrival order
        self._update_frames: dict[str, bytes] = {}
        self._versions: dict[int, VersionRecord] = {}
        self._version_frames: dict[int, bytes] = {}
        self._server_states: dict[int, bytes] = {}

    @staticmethod
    def _copy_version(record: VersionRecord) -> VersionRecord:
        return replace(record, metrics=dict(record.metrics))

    def _queue_length(self) -> int:
        return sum(1 for u in self._updates.values() if u.status == "queued")

    def accept_update(self, update: QueuedUpdate, frame: bytes) -> AcceptResult:
        with self._lock:
            duplicate = update.update_id in self._updates
            if not duplicate:
                self._updates[update.update_id] = replace(
                    update,
                    size=len(frame),
                    received_at=update.received_at or time.time(),
                    status="queued",
                    aggregated_into=None,
                )
                self._update_frames[update.update_id] = bytes(frame)
            return AcceptResult(duplicate=duplicate, queue_length=self._queue_length())

    def queued(self) -> list[QueuedUpdate]:
        with self._lock:
            return [u for u in self._updates.values() if u.status == "queued"]

    def get_update(self, update_id: str) -> QueuedUpdate | None:
        with self._lock:
            return self._updates.get(update_id)

    def load_update(self, update_id: str) -> bytes:
        with self._lock:
            return self._update_frames[update_id]

    def commit_version(
        self, record: VersionRecord, frame: bytes, consumed: Iterable[str], server_state: bytes | None = None
    ) -> None:
        consumed = list(consumed)
        with self._lock:
            latest = max(self._versions, default=None)
            if latest is not None and record.version <= latest:
                raise ValueError(f"version {record.version} is not newer than stored version {latest}")
            # Validate everything before changing anything: the commit is all or nothing.
            changed: dict[str, QueuedUpdate] = {}
            for update_id in consumed:
                current = self._updates.get(update_id)
                if current is None or current.status != "queued" or update_id in changed:
                    raise ValueError(f"update {update_id} is not queued")
                changed[update_id] = replace(current, status="aggregated", aggregated_into=record.version)
            self._versions[record.version] = self._copy_version(record)
            self._version_frames[record.version] = bytes(frame)
            if server_state is not None:
                self._server_states[record.version] = bytes(server_state)
            self._updates.update(changed)

    def latest_version(self) -> VersionRecord | None:
        with self._lock:
            if not self._versions:
                return None
            return self._copy_version(self._versions[max(self._versions)])

    def get_version(self, version: int) -> VersionRecord | None:
        with self._lock:
            record = self._versions.get(version)
            return None if record is None else self._copy_version(record)

    def load_version(self, version: int) -> bytes:
        with self._lock:
            return self._version_frames[version]

    def load_server_state(self, version: int) -> bytes | None:
        with self._lock:
            return self._server_states.get(version)

    def versions(self) -> list[VersionRecord]:
        with self._lock:
            return [self._copy_version(self._versions[v]) for v in sorted(self._versions)]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(u.status for u in self._updates.values()))

    def prune_versions(self, keep: int) -> list[int]:
        _check_keep(keep)
        with self._lock:
            pruned = sorted(self._versions)[:-keep]
            for v in pruned:
                del self._versions[v]
                del self._version_frames[v]
                self._server_states.pop(v, None)
        return pruned

    def close(self) -> None:
        """Nothing to release; the data stays readable until the store is dropped."""
