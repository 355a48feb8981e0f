"""One contract suite for every :class:`HubStore` backend (in the style of Flower's linkstate tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ffm_hub.store import HubStore, MemoryStore, QueuedUpdate, SqliteStore, VersionRecord


def update(uid: str, n: int = 5, received_at: float = 1.0) -> QueuedUpdate:
    return QueuedUpdate(uid, "dev-1", 0, n, "lora", "int8", 0, received_at)


def version(v: int, parent: int | None, accuracy: float = 0.5) -> VersionRecord:
    kind = "init" if parent is None else "fedavg"
    return VersionRecord(v, parent, "ab" * 32, 3, 1.0, 0, kind, {"accuracy": accuracy})


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubStore]:
    backend: HubStore = SqliteStore(tmp_path / "store") if request.param == "sqlite" else MemoryStore()
    yield backend
    backend.close()


def frames_on_disk(store: HubStore) -> list[str] | None:
    """The version files of a SqliteStore (None for backends without files)."""
    if isinstance(store, SqliteStore):
        return sorted(p.name for p in (store.root / "versions").iterdir())
    return None


# -- accept -----------------------------------------------------------------------------------------


def test_accept_records_metadata(store: HubStore) -> None:
    result = store.accept_update(update("u1", n=7), b"frame-1")
    assert result.duplicate is False and result.queue_length == 1
    got = store.get_update("u1")
    assert got is not None
    assert (got.update_id, got.device, got.num_samples, got.strategy, got.codec) == ("u1", "dev-1", 7, "lora", "int8")
    assert got.size == len(b"frame-1")  # size comes from the frame, not the caller
    assert (got.status, got.aggregated_into, got.received_at) == ("queued", None, 1.0)
    assert store.load_update("u1") == b"frame-1"


def test_accept_fills_in_missing_received_at(store: HubStore) -> None:
    store.accept_update(update("u1", received_at=0.0), b"x")
    got = store.get_update("u1")
    assert got is not None and got.received_at > 0


def test_duplicate_accept_changes_nothing_and_first_frame_wins(store: HubStore) -> None:
    assert store.accept_update(update("u1", n=5), b"frame-1").duplicate is False
    again = store.accept_update(update("u1", n=9), b"other")
    assert again.duplicate is True and again.queue_length == 1
    assert store.load_update("u1") == b"frame-1"
    got = store.get_update("u1")
    assert got is not None and got.num_samples == 5 and got.size == len(b"frame-1")
    assert store.counts() == {"queued": 1}


def test_duplicate_of_aggregated_update_is_still_a_duplicate(store: HubStore) -> None:
    store.accept_update(update("u1"), b"1")
    store.commit_version(version(0, None), b"v0", ["u1"])
    again = store.accept_update(update("u1"), b"again")
    assert again.duplicate is True and again.queue_length == 0
    assert store.queued() == []
    assert store.load_update("u1") == b"1"


def test_queue_keeps_arrival_order_and_length(store: HubStore) -> None:
    ids = ["zeta", "alpha", "mid", "beta"]  # not sorted: order must be arrival, not name
    for i, uid in enumerate(ids, start=1):
        assert store.accept_update(update(uid), uid.encode()).queue_length == i
    assert [u.update_id for u in store.queued()] == ids
    store.accept_update(update("alpha"), b"dup")  # a duplicate does not move it
    assert [u.update_id for u in store.queued()] == ids


# -- commit -----------------------------------------------------------------------------------------


def test_commit_version_consumes_updates(store: HubStore) -> None:
    assert store.latest_version() is None and store.versions() == []
    store.commit_version(version(0, None), b"v0", [])
    for uid in ("u1", "u2", "u3"):
        store.accept_update(update(uid), uid.encode())
    store.commit_version(version(1, 0, accuracy=0.75), b"v1", ["u1", "u3"])
    assert [u.update_id for u in store.queued()] == ["u2"]
    u1, u2 = store.get_update("u1"), store.get_update("u2")
    assert u1 is not None and (u1.status, u1.aggregated_into) == ("aggregated", 1)
    assert u2 is not None and (u2.status, u2.aggregated_into) == ("queued", None)
    latest = store.latest_version()
    assert latest is not None and latest.version == 1 and latest.parent == 0
    assert latest.metrics == {"accuracy": 0.75}
    assert store.load_version(1) == b"v1" and store.load_version(0) == b"v0"
    assert store.load_update("u1") == b"u1"  # frames of aggregated updates stay readable
    assert store.accept_update(update("u4"), b"4").queue_length == 2


@pytest.mark.parametrize(
    "consumed",
    [["u1", "missing"], ["missing", "u1"], ["u1", "u1"], ["u1", "old"]],
    ids=["unknown-last", "unknown-first", "listed-twice", "already-aggregated"],
)
def test_commit_rolls_back_completely_on_a_bad_consumed_id(store: HubStore, consumed: list[str]) -> None:
    store.accept_update(update("old"), b"o")
    store.commit_version(version(0, None), b"v0", ["old"])
    store.accept_update(update("u1"), b"1")
    store.accept_update(update("u2"), b"2")
    files_before = frames_on_disk(store)
    with pytest.raises(ValueError, match="not queued"):
        store.commit_version(version(1, 0), b"v1", consumed)
    latest = store.latest_version()
    assert latest is not None and latest.version == 0  # no version row ...
    assert store.get_version(1) is None
    with pytest.raises(KeyError):
        store.load_version(1)  # ... no frame ...
    assert frames_on_disk(store) == files_before
    assert [u.update_id for u in store.queued()] == ["u1", "u2"]  # ... and nothing consumed
    assert store.counts() == {"queued": 2, "aggregated": 1}
    old = store.get_update("old")
    assert old is not None and old.aggregated_into == 0
    store.commit_version(version(1, 0), b"v1", ["u1", "u2"])  # the same version number still works
    assert store.queued() == [] and store.load_version(1) == b"v1"


def test_server_state_is_committed_with_its_version(store: HubStore) -> None:
    store.commit_version(version(0, None), b"v0", [])
    store.accept_update(update("u1"), b"1")
    store.commit_version(version(1, 0), b"v1", ["u1"], server_state=b"momentum-after-v1")
    assert store.load_server_state(0) is None  # committed without one
    assert store.load_server_state(1) == b"momentum-after-v1"
    assert store.load_server_state(7) is None  # unknown version
    store.accept_update(update("u2"), b"2")
    with pytest.raises(ValueError, match="not queued"):  # a failed commit leaves no server state behind
        store.commit_version(version(2, 1), b"v2", ["u2", "missing"], server_state=b"never")
    assert store.load_server_state(2) is None
    store.commit_version(version(2, 1), b"v2", ["u2"], server_state=b"momentum-after-v2")
    assert store.load_server_state(2) == b"momentum-after-v2"
    assert store.prune_versions(1) == [0, 1]  # pruning a version drops its server state too
    assert store.load_server_state(1) is None and store.load_server_state(2) == b"momentum-after-v2"


def test_sqlite_server_state_survives_reopening(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "store")
    first.commit_version(version(0, None), b"v0", [], server_state=b"\x00\x01binary")
    first.close()
    reopened = SqliteStore(tmp_path / "store")
    try:
        assert reopened.load_server_state(0) == b"\x00\x01binary"
    finally:
        reopened.close()


def test_version_must_move_forward(store: HubStore) -> None:
    store.commit_version(version(3, None), b"v3", [])
    store.accept_update(update("u1"), b"1")
    for stale in (3, 2):
        with pytest.raises(ValueError, match="not newer"):
            store.commit_version(version(stale, None), b"stale", ["u1"])
    assert store.load_version(3) == b"v3" and store.get_version(2) is None
    assert [u.update_id for u in store.queued()] == ["u1"]  # the refused commit consumed nothing
    store.commit_version(version(10, 3), b"v10", ["u1"])  # gaps are allowed
    assert [v.version for v in store.versions()] == [3, 10]


def test_versions_are_listed_oldest_first(store: HubStore) -> None:
    store.commit_version(version(0, None), b"v0", [])
    store.commit_version(version(1, 0, accuracy=0.6), b"v1", [])
    store.commit_version(version(5, 1, accuracy=0.7), b"v5", [])
    listed = store.versions()
    assert [(v.version, v.parent, v.kind) for v in listed] == [(0, None, "init"), (1, 0, "fedavg"), (5, 1, "fedavg")]
    assert [v.metrics["accuracy"] for v in listed] == [0.5, 0.6, 0.7]
    assert store.get_version(1) == listed[1]


def test_returned_records_do_not_alias_the_store(store: HubStore) -> None:
    record = version(0, None)
    store.commit_version(record, b"v0", [])
    record.metrics["accuracy"] = 0.0  # mutating the caller's dict ...
    got = store.get_version(0)
    assert got is not None and got.metrics == {"accuracy": 0.5}
    got.metrics["loss"] = 1.0  # ... or a returned one changes nothing stored
    again = store.latest_version()
    assert again is not None and again.metrics == {"accuracy": 0.5}


# -- unknown ids --------------------------------------------------------------------------------------


def test_unknown_ids_get_none_and_load_raises_key_error(store: HubStore) -> None:
    assert store.get_update("nope") is None
    assert store.get_version(0) is None
    assert store.latest_version() is None
    with pytest.raises(KeyError):
        store.load_update("nope")
    with pytest.raises(KeyError):
        store.load_version(0)
    store.commit_version(version(0, None), b"v0", [])
    with pytest.raises(KeyError):
        store.load_version(1)


# -- counts -------------------------------------------------------------------------------------------


def test_counts_per_status(store: HubStore) -> None:
    assert store.counts() == {}
    for uid in ("u1", "u2", "u3"):
        store.accept_update(update(uid), b"x")
    assert store.counts() == {"queued": 3}
    store.commit_version(version(0, None), b"v0", ["u1", "u2"])
    assert store.counts() == {"queued": 1, "aggregated": 2}
    store.commit_version(version(1, 0), b"v1", ["u3"])
    assert store.counts() == {"aggregated": 3}


# -- prune --------------------------------------------------------------------------------------------


def test_prune_versions_keeps_the_newest(store: HubStore) -> None:
    for v in range(5):
        store.accept_update(update(f"u{v}"), b"x")
        store.commit_version(version(v, v - 1 if v else None), f"v{v}".encode(), [f"u{v}"])
    assert store.prune_versions(2) == [0, 1, 2]
    assert [v.version for v in store.versions()] == [3, 4]
    latest = store.latest_version()
    assert latest is not None and latest.version == 4
    assert store.get_version(3) is not None and store.load_version(3) == b"v3"
    for gone in (0, 1, 2):  # row and frame go, even the parent of a kept version
        assert store.get_version(gone) is None
        with pytest.raises(KeyError):
            store.load_version(gone)
    if isinstance(store, SqliteStore):
        assert frames_on_disk(store) == ["0000000003.ffmg", "0000000004.ffmg"]
    u0 = store.get_update("u0")  # updates are history and stay, with their aggregated_into
    assert u0 is not None and u0.aggregated_into == 0
    assert store.counts() == {"aggregated": 5}
    assert store.prune_versions(2) == []  # nothing more to prune
    store.commit_version(version(5, 4), b"v5", [])  # monotonicity is unaffected
    with pytest.raises(ValueError, match="not newer"):
        store.commit_version(version(2, None), b"v2", [])
    assert store.prune_versions(1) == [3, 4]
    assert [v.version for v in store.versions()] == [5]


def test_prune_versions_never_drops_the_latest(store: HubStore) -> None:
    assert store.prune_versions(1) == []  # empty store
    store.commit_version(version(0, None), b"v0", [])
    assert store.prune_versions(1) == []
    assert store.prune_versions(10) == []
    for bad in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            store.prune_versions(bad)
    assert store.load_version(0) == b"v0"


# -- concurrency --------------------------------------------------------------------------------------


def test_concurrent_accepts_lose_and_double_count_nothing(store: HubStore) -> None:
    threads, per_thread, shared = 8, 25, 10
    barrier = threading.Barrier(threads)
    new_ids: list[list[str]] = [[] for _ in range(threads)]
    lengths: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                # Each thread sends its own updates and also races the others on a shared set.
                for uid in (f"t{t}-u{i}", f"shared-{i % shared}"):
                    result = store.accept_update(update(uid), uid.encode())
                    lengths[t].append(result.queue_length)
                    if not result.duplicate:
                        new_ids[t].append(uid)
        except BaseException as exc:  # pragma: no cover - surfaced by the assert below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    accepted = [uid for ids in new_ids for uid in ids]
    expected = {f"t{t}-u{i}" for t in range(threads) for i in range(per_thread)} | {
        f"shared-{i}" for i in range(shared)
    }
    assert sorted(accepted) == sorted(expected)  # each id is new exactly once: no loss, no double count
    queued = store.queued()
    assert len(queued) == len(expected) and {u.update_id for u in queued} == expected
    assert store.counts() == {"queued": len(expected)}
    assert max(n for ls in lengths for n in ls) == len(expected)
    for ls in lengths:
        assert ls == sorted(ls)  # queue length seen by one thread never shrinks
    for uid in expected:
        assert store.load_update(uid) == uid.encode()
    store.commit_version(version(0, None), b"v0", [u.update_id for u in queued])
    assert store.counts() == {"aggregated": len(expected)}
