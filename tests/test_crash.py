"""``kill -9`` of the hub at four points, then a restart: nothing receipted is lost, nothing is counted
twice, versions never go backwards and every version is the n_k-weighted mean of what it consumed.

The hub runs as a real process on a real broker; the device resends whatever it has no receipt for,
as the edge's outbox does.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ffm_edge.transport import MqttTransport
from ffm_edge.wire import (
    Manifest,
    Receipt,
    Topics,
    UpdateMeta,
    decode_global,
    decode_message,
    decode_update,
    encode_update,
    split_frame,
)
from ffm_hub.brokers import ManagedBroker
from ffm_hub.faults import CRASH_POINTS
from ffm_hub.store import SqliteStore

RUNNER = Path(__file__).with_name("crash_hub.py")
UPDATES = 4
TAU = 2


def start_hub(
    broker: ManagedBroker, state: Path, crash_at: str | None, optimizer: str = "fedavg"
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "FFM_CRASH_AT"}
    if crash_at:
        env["FFM_CRASH_AT"] = crash_at
    cmd = [sys.executable, str(RUNNER), broker.host, str(broker.port), str(state), str(TAU), optimizer]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_until_done(
    point: str, trial: int, broker: ManagedBroker, tmp_path: Path, optimizer: str = "fedavg"
) -> tuple[dict[str, bytes], int]:
    """Send UPDATES updates to a hub that dies at the trial-th pass of ``point``; restart it; wait for
    every receipt and the final version. Returns the frames sent and the final version number."""
    mqtt_broker = broker
    topics = Topics("crash")
    inbox: queue.Queue[object] = queue.Queue()
    device = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"dev-{tmp_path.name}")
    device.subscribe(topics.downlink_control("dev"), lambda _t, p: inbox.put(decode_message(p)))
    device.subscribe(topics.manifest(), lambda _t, p: inbox.put(decode_message(p)))
    device.connect(timeout=30)
    frames = {}
    for i in range(UPDATES):
        meta = UpdateMeta("crash", "dev", f"u{i}", 0, "lora", 10 + i, "fp32", time.time())
        frames[meta.update_id] = encode_update(meta, {"lora_A": np.full((2, 3), float(i + 1), np.float32)})
    # Crash at the trial-th pass of the point (the second trial dies later in the run).
    hub = start_hub(mqtt_broker, tmp_path / "hub", f"{point}:{trial}", optimizer)
    pending = dict(frames)
    restarts = 0
    seen = -1  # the newest version announced
    deadline = time.monotonic() + 120
    try:
        while pending and time.monotonic() < deadline:
            for update_id, frame in list(pending.items()):
                for chunk in split_frame(frame, chunk_size=1024, transfer_id=update_id):
                    device.publish(topics.uplink_update("dev"), chunk)
            wait_until = time.monotonic() + 3
            while time.monotonic() < wait_until:
                try:
                    message = inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(message, Receipt):
                    pending.pop(message.update_id, None)
                elif isinstance(message, Manifest):
                    seen = max(seen, message.version)
            if hub.poll() is not None:  # it died at the crash point: restart it without the fault
                assert hub.returncode == -9
                restarts += 1
                hub = start_hub(mqtt_broker, tmp_path / "hub", None, optimizer)
        assert not pending, f"no receipt for {sorted(pending)}"
        assert restarts == 1, "the fault fired exactly once"
        # Wait for the last aggregation, announced by the manifest of the final version.
        final = UPDATES // TAU
        deadline = time.monotonic() + 30
        while seen < final and time.monotonic() < deadline:
            try:
                message = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(message, Manifest):
                seen = max(seen, message.version)
        assert seen == final
    finally:
        hub.terminate()
        hub.wait(30)
        device.close()
    return frames, final


@pytest.mark.parametrize("trial", [1, 2])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_hub_kill_9_loses_nothing(point: str, trial: int, mqtt_broker: ManagedBroker, tmp_path: Path) -> None:
    frames, final = run_until_done(point, trial, mqtt_broker, tmp_path)
    store = SqliteStore(tmp_path / "hub")
    try:
        versions = store.versions()
        assert [v.version for v in versions] == list(range(final + 1))  # never backwards, no gap
        consumed: dict[int, list[str]] = {}
        for update_id in frames:  # every update stored once and aggregated once
            record = store.get_update(update_id)
            assert record is not None and record.status == "aggregated"
            consumed.setdefault(record.aggregated_into, []).append(update_id)
        assert store.queued() == []
        for record in versions[1:]:  # each version = parent + n_k-weighted mean of exactly its updates
            ids = consumed[record.version]
            assert len(ids) == TAU == record.num_updates
            _, before = decode_global(store.load_version(record.parent))
            _, after = decode_global(store.load_version(record.version))
            metas = [decode_update(store.load_update(u)) for u in ids]
            total = sum(m.num_samples for m, _ in metas)
            expected = before["lora_A"] + sum(d["lora_A"] * m.num_samples / total for m, d in metas)
            np.testing.assert_allclose(after["lora_A"], expected, rtol=1e-6)
    finally:
        store.close()


@pytest.mark.parametrize("point", ["aggregating", "committing"])
def test_hub_kill_9_keeps_server_momentum_with_its_version(
    point: str, mqtt_broker: ManagedBroker, tmp_path: Path
) -> None:
    """FedAvgM: the momentum committed with each version is the one its step used, across a SIGKILL."""
    from safetensors.numpy import load as load_tensors

    frames, final = run_until_done(point, 2, mqtt_broker, tmp_path, optimizer="fedavgm")
    store = SqliteStore(tmp_path / "hub")
    try:
        versions = store.versions()
        assert [v.version for v in versions] == list(range(final + 1))
        momentum = np.zeros((2, 3), np.float64)
        for record in versions[1:]:  # u = 0.5 u + mean delta; version = parent + u (η = 1)
            ids = [u for u in frames if store.get_update(u).aggregated_into == record.version]  # type: ignore[union-attr]
            metas = [decode_update(store.load_update(u)) for u in ids]
            total = sum(m.num_samples for m, _ in metas)
            momentum = 0.5 * momentum + sum(d["lora_A"] * m.num_samples / total for m, d in metas)
            _, before = decode_global(store.load_version(record.parent))
            _, after = decode_global(store.load_version(record.version))
            np.testing.assert_allclose(after["lora_A"], before["lora_A"] + momentum, rtol=1e-6)
            blob = store.load_server_state(record.version)
            assert blob is not None
            np.testing.assert_allclose(load_tensors(blob)["momentum_buffer/lora_A"], momentum, rtol=1e-6)
    finally:
        store.close()
