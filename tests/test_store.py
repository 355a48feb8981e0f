"""The hub's durable store: duplicates, atomic version commits, orphan clean-up, reopen."""

from __future__ import annotations

from pathlib import Path

import pytest

from ffm_hub.store import QueuedUpdate, SqliteStore, VersionRecord


def update(uid: str, n: int = 5) -> QueuedUpdate:
    return QueuedUpdate(uid, "dev-1", 0, n, "lora", "int8", 0, 1.0)


def version(v: int, parent: int | None) -> VersionRecord:
    return VersionRecord(v, parent, "ab" * 32, 3, 1.0, 0, "init" if parent is None else "fedavg", {"accuracy": 0.5})


def test_accept_is_idempotent_by_update_id(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    assert store.accept_update(update("u1"), b"frame-1").duplicate is False
    again = store.accept_update(update("u1"), b"other")
    assert again.duplicate is True and again.queue_length == 1
    assert store.load_update("u1") == b"frame-1"  # the first copy wins


def test_commit_version_consumes_updates_atomically(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    store.commit_version(version(0, None), b"v0", [])
    store.accept_update(update("u1"), b"1")
    store.accept_update(update("u2"), b"2")
    with pytest.raises(ValueError, match="not queued"):
        store.commit_version(version(1, 0), b"v1", ["u1", "missing"])
    assert store.latest_version().version == 0  # rolled back: no version 1 ...
    assert [u.update_id for u in store.queued()] == ["u1", "u2"]  # ... and nothing consumed
    store.commit_version(version(1, 0), b"v1", ["u1", "u2"])
    assert store.queued() == []
    assert store.get_update("u1").aggregated_into == 1
    with pytest.raises(ValueError, match="not newer"):
        store.commit_version(version(1, 0), b"again", [])


def test_state_survives_reopen_and_orphans_are_removed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    store.commit_version(version(0, None), b"v0", [])
    store.accept_update(update("u1", n=7), b"1")
    store.close()
    # Files a crash left behind without their row: never receipted, so dropped on start.
    (tmp_path / "updates" / "ghost.ffmu").write_bytes(b"x")
    (tmp_path / "versions" / "0000000009.ffmg").write_bytes(b"x")
    (tmp_path / "updates" / "half.ffmu.tmp").write_bytes(b"x")
    reopened = SqliteStore(tmp_path)
    assert reopened.latest_version().metrics == {"accuracy": 0.5}
    assert [(u.update_id, u.num_samples) for u in reopened.queued()] == [("u1", 7)]
    assert sorted(p.name for p in (tmp_path / "updates").iterdir()) == ["u1.ffmu"]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0000000000.ffmg"]
    assert reopened.load_version(0) == b"v0"
