"""A mixed federation over a real Mosquitto: devices on torch and devices on ORT, one hub.

The hub cannot tell the runtimes apart: both send the same tensors under the same names in the same
codec; every version aggregates updates of both kinds and equals the previous version plus their
n_k-weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from ort_helpers import built_artifacts, require_ort, sentiment_data, short_spec
from wire_device import run_edges, stored_update

from ffm_edge.client import EdgeClient
from ffm_edge.data import get_task
from ffm_edge.transport import MqttTransport
from ffm_edge.wire import decode_global, decode_update
from ffm_hub.brokers import MosquittoBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

TORCH_DEVICES = ("torch-0",)
ORT_DEVICES = ("ort-0", "ort-1")


def test_torch_and_ort_devices_federate_over_mosquitto(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, mosquitto_broker: MosquittoBroker
) -> None:
    require_ort()
    from ffm_edge.trainer import TorchTrainer

    artifacts = built_artifacts(tmp_path_factory.mktemp("ort-artifacts"), "lora", dropout=False, from_frame=True)
    spec, task = short_spec(), get_task("sst2")
    hub_trainer = TorchTrainer(spec, task, "lora", seed=0)
    eval_data = sentiment_data(16, seed=99)

    def evaluate(state: Mapping[str, np.ndarray]) -> dict[str, float]:
        hub_trainer.load_trainable_state(state)
        return hub_trainer.evaluate(eval_data)

    def transport(name: str) -> MqttTransport:
        return MqttTransport(mosquitto_broker.host, mosquitto_broker.port, client_id=f"{name}-{tmp_path.name}")

    devices = TORCH_DEVICES + ORT_DEVICES
    rounds = 2
    store = SqliteStore(tmp_path / "hub")
    hub_transport = transport("hub")
    hub_transport.connect()
    settings = HubSettings(federation="mixed", model=spec.name, tau=len(devices), chunk_size=16 * 1024)
    hub = Hub(settings, hub_transport, store, initial_state=hub_trainer.trainable_state, evaluate=evaluate)
    hub.start()
    edges = [
        EdgeClient(
            spec,
            sentiment_data(12 + 4 * i, seed=i, skew=0.2 + 0.3 * i),
            device_id=device,
            federation="mixed",
            transport=transport(device),
            state_dir=tmp_path / device,
            chunk_size=16 * 1024,
            batch_size=8,
            seed=i,
            receipt_timeout=60,
            heartbeat_interval=0,
            runtime="ort" if device in ORT_DEVICES else "torch",
            ort_artifacts=artifacts if device in ORT_DEVICES else None,
            threads=1,
        )
        for i, device in enumerate(devices)
    ]
    assert [e.runtime for e in edges] == ["torch", "ort", "ort"]
    results = run_edges(edges, rounds)
    assert hub.wait_idle(60)
    hub.stop()
    hub_transport.close()

    versions = store.versions()
    assert [v.version for v in versions] == list(range(rounds + 1)), "the global version advanced once per round"
    receipted = {r.update_id: devices[i] for i, per_edge in enumerate(results) for r in per_edge}
    assert len(receipted) == len(devices) * rounds
    names_by_runtime: dict[str, set[tuple[str, ...]]] = {"torch": set(), "ort": set()}
    for record in versions[1:]:
        assert record.parent is not None, "every version after the first has a parent"
        _, before = decode_global(store.load_version(record.parent))
        _, after = decode_global(store.load_version(record.version))
        consumed = [u for u in receipted if stored_update(store, u).aggregated_into == record.version]
        kinds = {"ort" if receipted[u] in ORT_DEVICES else "torch" for u in consumed}
        assert kinds == {"torch", "ort"}, "the hub accepted and aggregated updates of both runtimes"
        total = sum(stored_update(store, u).num_samples for u in consumed)
        expected = {k: v.astype(np.float64) for k, v in before.items()}
        for update_id in consumed:
            meta, delta = decode_update(store.load_update(update_id))
            assert meta.base_version == record.parent and meta.codec == "int8" and meta.strategy == "lora"
            names_by_runtime["ort" if receipted[update_id] in ORT_DEVICES else "torch"].add(tuple(sorted(delta)))
            for name, value in delta.items():
                expected[name] += value.astype(np.float64) * meta.num_samples / total
        for name, value in after.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert names_by_runtime["torch"] == names_by_runtime["ort"], "same tensors on the wire from both runtimes"
    assert len(names_by_runtime["ort"]) == 1
    ort_losses = [r.train.mean_loss for i, per in enumerate(results) if devices[i] in ORT_DEVICES for r in per]
    assert all(np.isfinite(ort_losses))
