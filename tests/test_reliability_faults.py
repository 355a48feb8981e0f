"""The fault-injection scenarios of the reliability suite (issue 7) on both real brokers, at the sizes
the issue names, plus the two tools they stand on: the chaos proxy and the store audit.

Every figure a scenario reports is read from the hub's durable store, so these tests first show that the
audit does catch a lost update, an update counted twice and a corrupt checkpoint.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from conftest import require_mosquitto

from ffm_edge.wire import GlobalMeta, UpdateMeta, encode_global, encode_update
from ffm_hub.faults import CRASH_POINTS
from ffm_hub.hub import HubSettings
from ffm_hub.reliability import Context, Outcome
from ffm_hub.reliability.fault_scenarios import EDGE_KILL_CASES, SCENARIOS, audit_store
from ffm_hub.reliability.proxy import ChaosProxy
from ffm_hub.store import HubStore, MemoryStore, QueuedUpdate, SqliteStore, VersionRecord

SCENARIO = {scenario.name: scenario for scenario in SCENARIOS}


@pytest.fixture(
    params=[pytest.param("amqtt", id="amqtt"), pytest.param("mosquitto", id="mosquitto", marks=pytest.mark.mosquitto)]
)
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Context:
    """A scenario context on each real broker in turn (Mosquitto required where FFM_REQUIRE_MOSQUITTO=1)."""
    if request.param == "mosquitto":
        require_mosquitto()
    return Context(request.param, tmp_path)


def run(name: str, ctx: Context) -> list[Outcome]:
    rows = SCENARIO[name].run(ctx)
    assert rows and all(row.scenario == name and row.broker == ctx.broker for row in rows)
    failed = [row for row in rows if not row.passed]
    assert not failed, failed
    return rows


# -- the scenarios ---------------------------------------------------------------------------------
def test_resets_lose_nothing_and_count_nothing_twice(ctx: Context) -> None:
    [row] = run("resets", ctx)
    assert row.tried == row.accepted == row.expected_accepted == 20 * 10
    assert row.lost == 0 and row.duplicates == 0
    assert row.metrics["resets"] > 0  # the proxy really cut connections mid-upload
    assert row.metrics["connections"] > 20  # and the devices really reconnected
    assert row.metrics["versions"] == 10  # one version per round, each of exactly 20 updates
    assert row.metrics["stale"] == 0  # every update was built on the version of its round
    assert row.metrics["rejected"] == 0


def test_broker_restart_mid_upload_completes_the_upload_once(ctx: Context) -> None:
    [row] = run("broker_restart", ctx)
    assert row.tried == row.accepted == 1 and row.lost == 0 and row.duplicates == 0
    assert row.metrics["restarted"] == 1
    assert 0 < row.metrics["delivered_before"] < row.metrics["chunks"]  # the hub held part of it
    assert row.metrics["hub_accepted"] == 1


def test_killed_edge_sends_its_update_after_restart_exactly_once(ctx: Context) -> None:
    rows = run("edge_kill", ctx)
    assert [row.case for row in rows] == [case.name for case in EDGE_KILL_CASES]
    for row in rows:
        assert row.tried == row.accepted == row.metrics["trials"] >= 2
        assert row.metrics["versions"] == row.tried  # tau = 1: one version per update, none twice
    awaiting_receipt = rows[-1]  # the hub took the update before the kill: the resend is a duplicate
    assert awaiting_receipt.metrics["duplicate_receipts"] >= 1


def test_killed_hub_loses_nothing_at_any_point(ctx: Context) -> None:
    rows = run("hub_kill", ctx)
    assert [row.case for row in rows] == [f"kill -9 at {point}" for point in CRASH_POINTS]
    for row in rows:
        assert row.metrics["trials"] == 3 and row.metrics["restarts"] == 3
        assert row.tried == row.accepted == 6 * 3
        assert row.metrics["backwards"] == 0


# -- the chaos proxy -------------------------------------------------------------------------------
@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP server that echoes what it gets, one thread per connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[:2]
    stop.set()
    thread.join(5)
    server.close()


def test_proxy_forwards_both_ways_and_resets_on_demand(echo_server: tuple[str, int]) -> None:
    with ChaosProxy(*echo_server) as proxy, socket.create_connection((proxy.host, proxy.port), timeout=5) as client:
        payload = bytes(range(256)) * 1000
        client.sendall(payload)
        received = b""
        while len(received) < len(payload):
            received += client.recv(65536)
        assert received == payload
        assert proxy.reset_all() == 1 and proxy.resets == 1
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # a RST as from a dropped network, not a FIN
            client.sendall(b"x")
            client.recv(1)
        assert proxy.live == 0


def test_proxy_resets_at_random_only_on_large_chunks(echo_server: tuple[str, int]) -> None:
    with ChaosProxy(*echo_server, reset_probability=1.0, min_reset_bytes=1000) as proxy:
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as client:
            client.sendall(b"small")
            assert client.recv(10) == b"small"  # under min_reset_bytes: forwarded
            client.sendall(b"x" * 5000)
            with pytest.raises(ConnectionResetError):
                while client.recv(65536):
                    pass
        deadline = time.monotonic() + 5
        while proxy.resets < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.resets == 1 and proxy.connections == 1


# -- the store audit -------------------------------------------------------------------------------
SETTINGS = HubSettings(federation="audit", tau=2)
ZERO = {"w": np.zeros(3, np.float32)}


def accept(store: HubStore, update_id: str, value: float, n: int) -> np.ndarray:
    delta = np.full(3, value, np.float32)
    frame = encode_update(UpdateMeta("audit", "d", update_id, 0, "lora", n, "fp32", time.time()), {"w": delta})
    store.accept_update(QueuedUpdate(update_id, "d", 0, n, "lora", "fp32", len(frame), time.time()), frame)
    return delta


def commit(store: HubStore, version: int, state: Mapping[str, np.ndarray], consumed: list[str], claimed: int) -> None:
    meta = GlobalMeta("audit", version, version - 1 if version else None, "m", "lora", "fp32", time.time(), claimed)
    frame = encode_global(meta, dict(state))
    record = VersionRecord(version, meta.parent, hashlib.sha256(frame).hexdigest(), len(frame), meta.created_at,
                           claimed, "fedavg" if version else "init")  # fmt: skip
    store.commit_version(record, frame, consumed)


def test_audit_passes_a_sound_store_and_counts_queued_updates() -> None:
    store = MemoryStore()
    commit(store, 0, ZERO, [], 0)
    a, b = accept(store, "a", 1.0, 10), accept(store, "b", 4.0, 30)
    commit(store, 1, {"w": (a * 10 + b * 30) / 40}, ["a", "b"], 2)
    accept(store, "c", 2.0, 5)  # receipted, still queued: not lost
    audit = audit_store(store, ["a", "b", "c"], ["a", "b", "c"], SETTINGS)
    assert (audit.accepted, audit.queued, audit.lost, audit.duplicates, audit.latest_version) == (3, 1, 0, 0, 1)
    assert audit.clean


def test_audit_counts_a_receipted_update_the_store_lacks_as_lost() -> None:
    store = MemoryStore()
    commit(store, 0, ZERO, [], 0)
    accept(store, "a", 1.0, 10)
    audit = audit_store(store, ["a", "b"], ["a", "b"], SETTINGS)
    assert (audit.accepted, audit.lost) == (1, 1) and not audit.clean


def test_audit_catches_an_update_counted_twice() -> None:
    store = MemoryStore()
    commit(store, 0, ZERO, [], 0)
    a, b = accept(store, "a", 1.0, 10), accept(store, "b", 4.0, 10)
    commit(store, 1, {"w": (2 * a + b) / 3}, ["a", "b"], 2)  # a weighed in twice
    audit = audit_store(store, ["a", "b"], ["a", "b"], SETTINGS)
    assert audit.duplicates == 1 and "not its parent plus the mean" in audit.problems[0]


def test_audit_catches_a_version_claiming_more_updates_than_it_consumed() -> None:
    store = MemoryStore()
    commit(store, 0, ZERO, [], 0)
    a = accept(store, "a", 1.0, 10)
    commit(store, 1, {"w": a}, ["a"], 2)
    assert audit_store(store, ["a"], ["a"], SETTINGS).duplicates == 1


def test_audit_catches_a_corrupt_checkpoint(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    try:
        commit(store, 0, ZERO, [], 0)
        [checkpoint] = (tmp_path / "versions").iterdir()
        data = bytearray(checkpoint.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte on disk
        checkpoint.write_bytes(bytes(data))
        audit = audit_store(store, [], [], SETTINGS)
    finally:
        store.close()
    [problem] = audit.problems
    assert problem.startswith("checkpoint of version 0 is unreadable") and not audit.clean
