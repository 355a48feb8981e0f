"""SqliteStore-only behaviour: reopen, orphan clean-up, files on disk.

The semantics every backend shares are in ``test_store_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ffm_hub.store import QueuedUpdate, SqliteStore, VersionRecord


def update(uid: str, n: int = 5) -> QueuedUpdate:
    return QueuedUpdate(uid, "dev-1", 0, n, "lora", "int8", 0, 1.0)


def version(v: int, parent: int | None) -> VersionRecord:
    return VersionRecord(v, parent, "ab" * 32, 3, 1.0, 0, "init" if parent is None else "fedavg", {"accuracy": 0.5})


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
    latest = reopened.latest_version()
    assert latest is not None and latest.metrics == {"accuracy": 0.5}
    assert [(u.update_id, u.num_samples) for u in reopened.queued()] == [("u1", 7)]
    assert sorted(p.name for p in (tmp_path / "updates").iterdir()) == ["u1.ffmu"]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0000000000.ffmg"]
    assert reopened.load_version(0) == b"v0"


def test_load_of_a_missing_frame_raises_key_error_from_file_not_found(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    with pytest.raises(KeyError) as update_err:
        store.load_update("nope")
    assert isinstance(update_err.value.__cause__, FileNotFoundError)
    with pytest.raises(KeyError) as version_err:
        store.load_version(3)
    assert isinstance(version_err.value.__cause__, FileNotFoundError)


def test_prune_survives_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    for v in range(4):
        store.commit_version(version(v, v - 1 if v else None), f"v{v}".encode(), [])
    assert store.prune_versions(2) == [0, 1]
    store.close()
    reopened = SqliteStore(tmp_path)
    assert [v.version for v in reopened.versions()] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0000000002.ffmg", "0000000003.ffmg"]
    assert reopened.load_version(3) == b"v3"
