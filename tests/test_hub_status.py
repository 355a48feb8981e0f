"""The hub's live status: status.json written by a real hub, `ffm-hub status` reading it, stale snapshots.

The in-memory tests drive a real :class:`Hub` with the scripted wire device; the last test runs
``ffm-hub serve`` as its own process on a real broker (amqtt, then Mosquitto), a device talking MQTT to
it, and reads its status from outside while it runs, after a clean stop, and after ``kill -9``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wire_device import FED, Device, memory_hub

from ffm_edge.transport import InMemoryBroker, MqttTransport
from ffm_edge.wire import (
    ChunkAssembler,
    Completed,
    Hello,
    Manifest,
    PullRequest,
    Receipt,
    Rejection,
    Topics,
    UpdateMeta,
    decode_global,
    decode_message,
    encode_message,
    encode_update,
    split_frame,
)
from ffm_hub.brokers import ManagedBroker
from ffm_hub.cli import main as hub_main
from ffm_hub.hub import Hub
from ffm_hub.status import (
    STATUS_FILE,
    StatusWriter,
    format_status,
    hub_snapshot,
    is_live,
    liveness,
    pid_alive,
    read_status,
    read_store,
)
from ffm_hub.store import SqliteStore

INTERVAL = 0.05  # seconds between snapshots in these tests


def delta(value: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((2, 3), value, np.float32), "head": np.zeros(2, np.float32)}


@pytest.fixture()
def hub(tmp_path: Path) -> Iterator[tuple[InMemoryBroker, Hub]]:
    """A hub with tau 2 whose store lies where ``ffm-hub serve`` puts it: ``<state_dir>/store``."""
    with memory_hub(tmp_path / "store") as running:
        yield running


def wait_for(
    read: Callable[[], dict[str, Any] | None], check: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """Poll ``read()`` until ``check`` holds for what it returns; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = read()
        if last is not None and check(last):
            return last
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s; last snapshot: {json.dumps(last)[:1500]}")


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_snapshot_follows_the_hub(hub: tuple[InMemoryBroker, Hub], tmp_path: Path) -> None:
    broker, h = hub
    d1, d2 = Device(broker, "d1"), Device(broker, "d2")
    d1.send_update(delta(1.0))
    assert d1.next(Receipt).queue_length == 1
    d2.send_update(delta(float("nan")))
    assert d2.next(Rejection).reason == "non_finite"

    writer = StatusWriter(h, tmp_path, interval=INTERVAL)
    assert not (tmp_path / STATUS_FILE).exists()
    with writer:
        snap = read_status(tmp_path)  # start() wrote the first snapshot before returning
        assert snap is not None and snap["running"] is True and snap["pid"] == os.getpid()
        assert snap["federation"] == FED and snap["strategy"] == "lora" and snap["tau"] == 2
        assert snap["interval"] == INTERVAL and 0 <= snap["uptime_s"] < 60
        assert snap["version"]["version"] == 0 and snap["version"]["kind"] == "init"
        assert snap["queue_length"] == 1
        assert snap["counters"] == {"accepted": 1, "duplicates": 0, "rejected": 1, "versions": 1}
        assert snap["rejections"] == {"non_finite": 1}
        assert [(d["device"], d["online"]) for d in snap["devices"]] == [("d1", True), ("d2", True)]
        assert all(0 <= d["seconds_since"] < 60 for d in snap["devices"])
        assert snap["devices_online"] == snap["devices_known"] == 2
        assert snap["round_bytes_in"] > 0
        assert liveness(snap).state == "running" and is_live(snap)

        # The second update completes tau: the thread's next snapshot shows version 1, queue empty.
        d1.send_update(delta(3.0))
        d1.next(Receipt)
        snap = wait_for(lambda: read_status(tmp_path), lambda s: s["version"]["version"] == 1)
        assert snap["queue_length"] == 0 and snap["version"]["num_updates"] == 2
        assert snap["version"]["kind"] == "fedavg" and snap["counters"]["versions"] == 2
        metrics = snap["version"]["metrics"]
        assert metrics["num_samples"] == 20 and metrics["devices"] == 1 and metrics["bytes_in"] > 0

        # A device the hub stops hearing from goes offline in the snapshot too.
        h._mark_offline("d2", "test")
        snap = wait_for(lambda: read_status(tmp_path), lambda s: s["devices_online"] == 1)
        assert {d["device"]: d["online"] for d in snap["devices"]} == {"d1": True, "d2": False}
    final = read_status(tmp_path)
    assert final is not None and final["running"] is False
    assert liveness(final).state == "stopped" and not is_live(final)
    writer.stop()  # idempotent: no second final write
    assert read_status(tmp_path) == final
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file behind


def test_snapshot_is_strict_json_and_survives_a_closed_store(hub: tuple[InMemoryBroker, Hub]) -> None:
    _broker, h = hub
    h.counters["accepted"] += 0  # the snapshot copies; it never holds the hub's dicts
    snap = hub_snapshot(h, started_at=None, now=time.time())
    assert snap["uptime_s"] is None and snap["devices"] == []
    json.dumps(snap, allow_nan=False)
    assert snap["counters"] is not h.counters

    h.store.close()
    broken = hub_snapshot(h)
    assert broken["version"] is None and broken["queue_length"] is None and broken["store_error"]
    assert broken["counters"]["versions"] == 1  # the in-memory part is still there
    assert "unreadable by the hub" in format_status(broken)


def test_cli_status_shows_the_live_section(
    hub: tuple[InMemoryBroker, Hub], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker, h = hub
    device = Device(broker, "edge-7")
    device.send_update(delta(1.0))
    device.next(Receipt)
    device.send_update(delta(1.0), federation="other")
    device.next(Rejection)
    # An update file the hub is writing right now (its row is not committed yet): `status` must
    # leave it alone, as opening a SqliteStore would not (its crash recovery deletes such files).
    in_flight = tmp_path / "store" / "updates" / "inflight.ffmu"
    in_flight.write_bytes(b"half")

    with StatusWriter(h, tmp_path, interval=INTERVAL):
        assert hub_main(["status", "--state-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert in_flight.exists()
        assert out.startswith("hub: running: pid ")
        assert f"federation {FED}, hub hub, model unknown, strategy lora, up " in out
        assert "version 0 (init, 0 updates)" in out
        assert "queue: 1/2 (aggregates at tau)" in out
        assert "1 accepted, 0 duplicates, 1 rejected (wrong_federation 1), 1 versions" in out
        assert "devices: 1 known, 1 online" in out
        assert "| edge-7 | yes | 0 s ago |" in out
        assert "updates: {'queued': 1}" in out  # the store part, as before
        assert "| 0 | - | init | 0 |" in out

        assert hub_main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
        document = json.loads(capsys.readouterr().out)
    assert document["state"] == "running" and document["reason"].startswith("pid ")
    assert document["status"]["queue_length"] == 1
    assert document["status"]["devices"][0]["device"] == "edge-7"
    assert document["store"]["updates"] == {"queued": 1}
    assert [v["version"] for v in document["store"]["versions"]] == [0]

    # After the clean stop the same command says so, and JSON says "stopped".
    assert hub_main(["status", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("hub: stopped (last snapshot, written at shutdown)")
    assert hub_main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "stopped"


def test_a_snapshot_from_a_dead_or_silent_hub_is_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    snapshot: dict[str, Any] = {"running": True, "pid": dead_pid(), "written_at": now - 1, "interval": 5.0, "tau": 3}
    (tmp_path / STATUS_FILE).write_text(json.dumps(snapshot))
    live = liveness(snapshot, now)
    assert live.state == "stale" and "is gone" in live.reason and not is_live(snapshot, now)

    # No store at all: the snapshot alone still answers the question.
    assert hub_main(["status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hub: NOT running (last snapshot is stale): process") and "crashed or killed?" in out
    assert f"store: none in {tmp_path}" in out
    assert hub_main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "stale" and document["store"] is None

    # A live process whose snapshot stopped being refreshed: hung (or another host's hub).
    silent = {**snapshot, "pid": os.getpid(), "written_at": now - 3600}
    assert liveness(silent, now).state == "stale" and "not updated for 60 min (hung?)" in liveness(silent, now).reason
    assert liveness({**silent, "written_at": now - 2}, now).state == "running"
    # Written on another machine (a shared state folder): the pid cannot be checked, the age decides.
    remote = {**snapshot, "host": "elsewhere.invalid", "written_at": now - 2}
    assert liveness(remote, now).state == "running"
    assert liveness({**remote, "written_at": now - 60}, now).state == "stale"

    assert pid_alive(os.getpid()) and not pid_alive(snapshot["pid"]) and not pid_alive(0)


def test_absent_or_unreadable_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert read_status(tmp_path) is None
    assert hub_main(["status", "--state-dir", str(tmp_path)]) == 2  # neither a store nor a snapshot

    SqliteStore(tmp_path / "store").close()  # a store, but no hub ever wrote a snapshot
    assert hub_main(["status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hub: no status snapshot in {tmp_path}")
    assert hub_main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "absent" and document["status"] is None
    assert document["store"]["versions"] == []

    (tmp_path / STATUS_FILE).write_text('{"running": tr')  # never written by the hub (atomic), but
    assert read_status(tmp_path) is None  # a hand-edited or foreign file reads as absent, not a crash
    summary = read_store(tmp_path)
    assert summary is not None and summary.updates == {} and summary.versions == []
    assert read_store(tmp_path / "elsewhere") is None


def test_writer_rejects_a_bad_interval(hub: tuple[InMemoryBroker, Hub], tmp_path: Path) -> None:
    _broker, h = hub
    with pytest.raises(ValueError, match="interval must be > 0"):
        StatusWriter(h, tmp_path, interval=0)


# -- a real `ffm-hub serve` process on a real broker ----------------------------------------------------------


class MqttDevice:
    """A scripted device on a real broker: hello, pull the global version, send one update."""

    def __init__(self, broker: ManagedBroker, device_id: str, federation: str) -> None:
        self.id = device_id
        self.federation = federation
        self.topics = Topics(federation)
        self.inbox: queue.Queue[object] = queue.Queue()
        self.assembler = ChunkAssembler()
        self.transport = MqttTransport(broker.host, broker.port, client_id=f"{device_id}-{uuid.uuid4().hex[:8]}")
        self.transport.subscribe(self.topics.downlink_control(device_id), self._on_control)
        self.transport.subscribe(self.topics.downlink_global(device_id), self._on_chunk)
        self.transport.connect(timeout=30)

    def _on_control(self, _topic: str, payload: bytes) -> None:
        self.inbox.put(decode_message(payload))

    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        done = self.assembler.add(payload)
        if done is not None:
            self.inbox.put(done)

    def send(self, message: Hello | PullRequest) -> None:
        self.transport.publish(self.topics.uplink_control(self.id), encode_message(message))

    def next(self, kind: type, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, kind):
                return item
        raise AssertionError(f"no {kind.__name__} within {timeout}s")

    def send_update(self, base_version: int, state: dict[str, np.ndarray]) -> str:
        meta = UpdateMeta(
            federation=self.federation, device=self.id, update_id=uuid.uuid4().hex, base_version=base_version,
            strategy="head", num_samples=8, codec="fp32", created_at=time.time(),
        )  # fmt: skip
        frame = encode_update(meta, {k: np.full_like(v, 0.01) for k, v in state.items()})
        for chunk in split_frame(frame, chunk_size=64 * 1024, transfer_id=meta.update_id):
            self.transport.publish(self.topics.uplink_update(self.id), chunk)
        return meta.update_id

    def close(self) -> None:
        self.transport.close()


@pytest.mark.slow  # loads EfficientNet-Lite0 (about a second) in the hub process
def test_serve_on_a_real_broker_writes_live_status(
    mqtt_broker: ManagedBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "hub"
    log_path = tmp_path / "hub.log"
    cmd = [
        sys.executable, "-m", "ffm_hub.cli", "--log-format", "json", "serve", "--broker", mqtt_broker.url,
        "--federation", "status", "--model", "efficientnet-lite0", "--task", "digits", "--strategy", "head",
        "--tau", "2", "--eval-limit", "16", "--state-dir", str(state_dir), "--no-advertise", "--threads", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("FFM_DATA_DIR", "FFM_LOG_FORMAT", "FFM_CRASH_AT")}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    device = None
    try:
        # serve() writes the first snapshot as soon as the hub is ready.
        first = wait_for(lambda: read_status(state_dir), lambda s: True, timeout=180)
        assert first["pid"] == process.pid and first["running"] and first["devices"] == []

        device = MqttDevice(mqtt_broker, "cam-1", "status")
        device.send(Hello("cam-1", None, "head"))
        manifest = device.next(Manifest)
        device.send(PullRequest("cam-1", PullRequest.LATEST, uuid.uuid4().hex, "head"))
        _meta, state = decode_global(device.next(Completed).data)
        device.send_update(manifest.version, state)
        assert device.next(Receipt).queue_length == 1

        # The next snapshot (every 5 s) names the device online and counts its update.
        snap = wait_for(
            lambda: read_status(state_dir), lambda s: s["counters"].get("accepted") == 1 and s["devices"], timeout=30
        )
        assert [(d["device"], d["online"]) for d in snap["devices"]] == [("cam-1", True)]
        assert snap["queue_length"] == 1 and snap["tau"] == 2 and snap["model"] == "efficientnet-lite0"
        assert snap["version"]["version"] == 0 and "accuracy" in snap["version"]["metrics"]

        assert hub_main(["status", "--state-dir", str(state_dir)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"hub: running: pid {process.pid} ")
        assert "| cam-1 | yes |" in out and "queue: 1/2" in out and "version 0 (init, 0 updates): accuracy=" in out

        process.send_signal(signal.SIGTERM)  # a clean stop writes a last snapshot, "running": false
        assert process.wait(60) == 0
        final = read_status(state_dir)
        assert final is not None and final["running"] is False and liveness(final).state == "stopped"
        assert final["counters"]["accepted"] == 1
    finally:
        if device is not None:
            device.close()
        if process.poll() is None:
            process.kill()
            process.wait(30)

    # Every line the hub logged is one JSON object (--log-format json), including the "ready" line.
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert any(m.startswith("hub ready: federation status") for m in messages), messages
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)

    # kill -9 leaves "running": true behind; the dead pid makes it read as stale.
    (state_dir / STATUS_FILE).write_text(json.dumps({**final, "running": True}))
    assert liveness(json.loads((state_dir / STATUS_FILE).read_text())).state == "stale"
    assert hub_main(["status", "--state-dir", str(state_dir)]) == 0
    assert capsys.readouterr().out.startswith("hub: NOT running (last snapshot is stale)")
