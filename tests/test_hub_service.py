"""The hub service wired end to end on a real broker: server optimizer, central steps on public data and
an adaptive policy deciding on held-out public examples, with real edge clients (offline digits data)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.numpy import load as load_tensors

from ffm_edge.client import EdgeClient
from ffm_edge.data import load_split
from ffm_edge.errors import ConfigError
from ffm_edge.spec import load_model_spec
from ffm_edge.transport.mqtt import MqttTransport
from ffm_hub.brokers import ManagedBroker
from ffm_hub.service import ServeOptions, running_hub, wait_for


@pytest.mark.slow  # EfficientNet-Lite0 twice (hub and edge), a few seconds
def test_service_with_fedavgm_central_steps_and_held_out_decisions(tmp_path: Path, mqtt_broker: ManagedBroker) -> None:
    opts = ServeOptions(
        federation="svc",
        model="efficientnet-lite0",
        task="digits",
        strategy="head",
        tau=1,
        server_optimizer="fedavgm",
        server_momentum=0.5,
        central_epochs=1,
        public_limit=16,
        validation_limit=24,
        policy="adaptive",
        max_central_steps=2,
        eval_limit=32,
        state_dir=tmp_path / "hub",
        broker=mqtt_broker.url,
        advertise=False,
    )
    data = load_split("digits", "train", limit=200, seed=5).subset(range(100, 132))
    with running_hub(opts) as hub:
        edge = EdgeClient(
            load_model_spec("efficientnet-lite0"),
            data,
            device_id="cam-1",
            federation="svc",
            strategy="head",
            transport=MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"cam-1-{tmp_path.name}"),
            state_dir=tmp_path / "edge",
        )
        with edge:
            results = edge.run_forever(rounds=2)
        assert hub.wait_idle()
        versions = hub.store.versions()
        latest = versions[-1].version
        server_state = hub.store.load_server_state(latest)
    assert [r.base_version for r in results] == [0, 1]
    assert len(versions) == 3
    for record in versions:  # decisions on held-out public data, reports on the evaluation split, both stored
        assert {"accuracy", "heldout_accuracy"} <= set(record.metrics)
    for record in versions[1:]:
        assert record.kind in ("fedavgm", "fedavgm+central", "reverted")
        assert record.metrics["decision"] in (0.0, 1.0)  # publish or revert: the policy decided
        assert 0 <= record.metrics["central_steps"] <= 2
    # FedAvgM's momentum is stored with the newest version (a reverted step restores the previous one)
    assert server_state is not None and all(k.startswith("momentum_buffer/") for k in load_tensors(server_state))


def test_validation_needs_public_examples_left(tmp_path: Path) -> None:
    opts = ServeOptions(
        model="efficientnet-lite0",
        task="digits",
        strategy="head",
        public_limit=10_000,
        validation_limit=8,
        state_dir=tmp_path / "hub",
        broker="mqtt://127.0.0.1:1",
        advertise=False,
    )
    with pytest.raises(ConfigError, match="no public examples left"), running_hub(opts):
        pass


def test_wait_for_wakes_when_the_signal_lands_on_another_thread() -> None:
    """Linux may deliver SIGTERM to any thread; Python runs the handler only in the main thread, so an
    untimed Event.wait() there never returns (the hub ignored SIGTERM: found by the hub_kill scenario)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    sleeper = threading.Thread(target=time.sleep, args=(3.0,), daemon=True)
    sleeper.start()
    assert sleeper.ident is not None
    sender = threading.Timer(0.2, signal.pthread_kill, args=(sleeper.ident, signal.SIGUSR1))
    try:
        sender.start()
        started = time.monotonic()
        wait_for(stop, poll_s=0.05)
        assert time.monotonic() - started < 2.0
    finally:
        sender.cancel()
        signal.signal(signal.SIGUSR1, previous)
