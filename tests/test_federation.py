"""End to end: a hub and 3 edge clients training LoRA on the real all-MiniLM-L6-v2.

Run over the in-memory fake, the embedded amqtt broker and a real Mosquitto. The checks are the
protocol's promises: the global version advances once per τ updates, each new version equals the
previous one plus the n_k-weighted mean of exactly the updates it consumed, and every update an edge
got a receipt for is in the hub's store, aggregated once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from wire_device import run_edges, stored_update

from ffm_edge.client import EdgeClient, RoundResult
from ffm_edge.data import LabeledData, get_task
from ffm_edge.spec import load_model_spec
from ffm_edge.trainer import TorchTrainer
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport, Transport
from ffm_edge.wire import decode_global, decode_update
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

pytestmark = pytest.mark.slow

POSITIVE = ["a wonderful, moving film", "great acting and a smart script", "i loved every minute", "superb"]
NEGATIVE = ["a dull, lifeless mess", "terrible acting and a silly plot", "i hated every minute", "awful"]


def sentiment_data(n: int, seed: int, skew: float) -> LabeledData:
    """Small labelled sentences built here; ``skew`` is the share of positive examples (non-IID)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < skew).astype(np.int64)
    inputs: list[tuple[str, str | None]] = [(str(rng.choice(POSITIVE if y else NEGATIVE)), None) for y in labels]
    return LabeledData(get_task("sst2"), inputs, labels)


def run_federation(
    tmp_path: Path, make_transport: Callable[[str], Transport], *, clients: int = 3, rounds: int = 2
) -> tuple[Hub, SqliteStore, list[list[RoundResult]]]:
    spec = load_model_spec("minilm-l6-v2")
    task = get_task("sst2")
    hub_trainer = TorchTrainer(spec, task, "lora", seed=0)
    store = SqliteStore(tmp_path / "hub")
    settings = HubSettings(federation="t", model=spec.name, tau=clients, chunk_size=16 * 1024)
    eval_data = sentiment_data(16, seed=99, skew=0.5)

    def evaluate(state: Mapping[str, np.ndarray]) -> dict[str, float]:
        hub_trainer.load_trainable_state(state)
        return hub_trainer.evaluate(eval_data)

    hub_transport = make_transport("hub")
    hub_transport.connect()
    hub = Hub(settings, hub_transport, store, initial_state=hub_trainer.trainable_state, evaluate=evaluate)
    hub.start()
    edges = [
        EdgeClient(
            spec,
            sentiment_data(12 + 4 * i, seed=i, skew=0.2 + 0.3 * i),
            device_id=f"edge-{i}",
            federation="t",
            transport=make_transport(f"edge-{i}"),
            state_dir=tmp_path / f"edge-{i}",
            chunk_size=16 * 1024,
            batch_size=8,
            seed=i,
            receipt_timeout=60,
            heartbeat_interval=0,
        )
        for i in range(clients)
    ]
    results = run_edges(edges, rounds)
    assert hub.wait_idle(60)
    hub.stop()
    hub_transport.close()
    return hub, store, results


def check_federation(store: SqliteStore, results: list[list[RoundResult]], clients: int, rounds: int) -> None:
    versions = store.versions()
    assert [v.version for v in versions] == list(range(rounds + 1)), "one version per round, never backwards"
    receipted = {r.update_id for per_edge in results for r in per_edge}
    assert len(receipted) == clients * rounds
    for update_id in receipted:  # no receipted update is lost, each aggregated exactly once
        update = store.get_update(update_id)
        assert update is not None and update.status == "aggregated"
    assert store.queued() == []
    for record in versions[1:]:
        assert record.parent is not None, "every version after the first has a parent"
        _, before = decode_global(store.load_version(record.parent))
        _, after = decode_global(store.load_version(record.version))
        consumed = [u for u in receipted if stored_update(store, u).aggregated_into == record.version]
        assert len(consumed) == clients == record.num_updates
        total = sum(stored_update(store, u).num_samples for u in consumed)
        expected = {k: v.astype(np.float64) for k, v in before.items()}
        for update_id in consumed:
            meta, delta = decode_update(store.load_update(update_id))
            assert meta.base_version == record.parent
            for name, value in delta.items():
                expected[name] += value.astype(np.float64) * meta.num_samples / total
        for name, value in after.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert any(not np.array_equal(after[k], before[k]) for k in after), "the version changed the weights"


def test_federation_in_memory(tmp_path: Path) -> None:
    broker = InMemoryBroker()

    def make(client_id: str) -> Transport:
        return InMemoryTransport(broker, client_id)

    _hub, store, results = run_federation(tmp_path, make)
    check_federation(store, results, clients=3, rounds=2)


def test_federation_over_real_broker(tmp_path: Path, mqtt_broker: ManagedBroker) -> None:
    def make(client_id: str) -> Transport:
        return MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"{client_id}-{tmp_path.name}")

    _hub, store, results = run_federation(tmp_path, make)
    check_federation(store, results, clients=3, rounds=2)
