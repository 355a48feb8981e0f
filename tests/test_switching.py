"""Switching between federated and central optimization: policies on constructed metric sequences, and
the hub applying them (central step, revert, down-weight) on plain arrays."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from ffm_edge.client import EdgeClient
from ffm_edge.data import LabeledData, get_task
from ffm_edge.errors import ConfigError
from ffm_edge.spec import load_model_spec
from ffm_edge.trainer import TorchTrainer
from ffm_edge.transport import InMemoryBroker, InMemoryTransport
from ffm_edge.transport.mqtt import MqttTransport
from ffm_edge.wire import Topics, UpdateMeta, decode_global, decode_update, encode_update, split_frame
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore
from ffm_hub.switching import AdaptivePolicy, FixedSchedule, SwitchingPolicy, make_policy

# What Hub takes as evaluate/validate and as central_step.
Metrics = Callable[[Mapping[str, np.ndarray]], dict[str, float]]
CentralStep = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@pytest.mark.parametrize(
    ("previous", "candidate", "tolerance", "on_worse", "action"),
    [
        (None, 0.7, 0.0, "revert", "publish"),  # nothing to compare with yet
        (0.70, 0.72, 0.0, "revert", "publish"),  # better
        (0.70, 0.70, 0.0, "revert", "publish"),  # equal is not worse
        (0.70, 0.69, 0.02, "revert", "publish"),  # within tolerance
        (0.70, 0.65, 0.02, "revert", "revert"),  # worse: keep the previous version
        (0.70, 0.65, 0.02, "downweight", "downweight"),  # worse: keep part of the step
    ],
)
def test_adaptive_policy_decisions(
    previous: float | None, candidate: float, tolerance: float, on_worse: str, action: str
) -> None:
    decision = AdaptivePolicy(tolerance=tolerance, on_worse=on_worse, mix=0.25).decide(previous, candidate)
    assert decision.action == action
    assert decision.reason  # every decision says why
    if action == "downweight":
        assert decision.mix == 0.25


def test_a_sequence_of_rounds() -> None:
    policy = AdaptivePolicy(tolerance=0.01)
    current = 0.50
    actions = []
    for candidate in [0.60, 0.58, 0.595, 0.70, 0.40, 0.71]:  # constructed held-out metrics per round
        decision = policy.decide(current, candidate)
        actions.append(decision.action)
        if decision.action == "publish":
            current = candidate
    assert actions == ["publish", "revert", "publish", "publish", "revert", "publish"]
    assert current == 0.71


def test_fixed_schedules_and_factory() -> None:
    assert FixedSchedule().central_after_aggregate is True
    assert make_policy("federated-only").central_after_aggregate is False
    assert make_policy("fixed").decide(0.9, 0.1).action == "publish"  # fixed never reverts
    assert isinstance(make_policy("adaptive", tolerance=0.05), AdaptivePolicy)
    with pytest.raises(ConfigError):
        make_policy("sometimes")
    with pytest.raises(ConfigError):
        AdaptivePolicy(on_worse="panic")
    with pytest.raises(ConfigError):
        make_policy("adaptive", bogus=1)


TARGET = 1.0
POSITIVE = ["a moving, brilliant film", "great fun", "wonderful performances", "i loved it"]
NEGATIVE = ["a dull, lifeless mess", "terrible acting", "i hated every minute", "awful"]


def sentiment_data(n: int, seed: int, skew: float) -> LabeledData:
    """Small labelled sentences built here; ``skew`` is the share of positive examples."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < skew).astype(np.int64)
    return LabeledData(get_task("sst2"), [(str(rng.choice(POSITIVE if y else NEGATIVE)), None) for y in labels], labels)


def score(state: Mapping[str, np.ndarray]) -> dict[str, float]:
    """A held-out 'accuracy' that is best when every weight equals TARGET."""
    return {"accuracy": float(1.0 - np.abs(state["w"] - TARGET).mean())}


def send(transport: InMemoryTransport, update_id: str, value: float, base: int) -> None:
    meta = UpdateMeta("fed", "d1", update_id, base, "lora", 10, "fp32", time.time())
    frame = encode_update(meta, {"w": np.full(3, value, np.float32)})
    for chunk in split_frame(frame, chunk_size=1024, transfer_id=update_id):
        transport.publish(Topics("fed").uplink_update("d1"), chunk)


def run_hub(
    tmp_path: Path, policy: SwitchingPolicy, central_step: CentralStep | None, deltas: list[float]
) -> tuple[Hub, SqliteStore]:
    broker = InMemoryBroker()
    hub_transport = InMemoryTransport(broker, "hub")
    hub_transport.connect()
    store = SqliteStore(tmp_path / "store")
    hub = Hub(
        HubSettings(federation="fed", tau=1),
        hub_transport,
        store,
        initial_state=lambda: {"w": np.zeros(3, np.float32)},
        evaluate=score,
        central_step=central_step,
        policy=policy,
    )
    hub.start()
    device = InMemoryTransport(broker, "d1")
    device.connect()
    for i, value in enumerate(deltas):
        send(device, f"u{i}", value, base=hub.current_version)
        deadline = time.monotonic() + 10
        while hub.current_version < i + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert hub.wait_idle()
    hub.stop()
    return hub, store


def test_hub_reverts_an_aggregate_that_makes_the_held_out_metric_worse(tmp_path: Path) -> None:
    hub, store = run_hub(tmp_path, AdaptivePolicy(central=False), None, deltas=[0.5, 2.0, 0.3])
    kinds = [v.kind for v in store.versions()]
    assert kinds == ["init", "fedavg", "reverted", "fedavg"]
    # 0 -> 0.5 (better, published) -> 2.5 would be worse (reverted: stays 0.5) -> 0.8 (better)
    np.testing.assert_allclose(hub.global_state()["w"], 0.8, rtol=1e-6)
    reverted = store.versions()[2]
    assert reverted.metrics["accuracy"] == pytest.approx(0.5) and reverted.metrics["candidate_accuracy"] < 0.5
    assert store.queued() == []  # the reverted round's update is consumed, not re-queued
    store.close()


def test_hub_downweights_and_runs_the_central_step(tmp_path: Path) -> None:
    def central(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # "training on public data": half-way towards the target
        return {"w": (state["w"] + 0.5 * (TARGET - state["w"])).astype(np.float32)}

    policy = AdaptivePolicy(on_worse="downweight", mix=0.5)
    hub, store = run_hub(tmp_path, policy, central, deltas=[0.0, 3.0])
    versions = store.versions()
    assert [v.kind for v in versions] == ["init", "fedavg+central", "downweighted"]
    # v1: 0 + 0 -> central -> 0.5. v2: 0.5 + 3 = 3.5 -> central -> 2.25 (worse), half the step: 1.375
    np.testing.assert_allclose(hub.global_state()["w"], 1.375, rtol=1e-6)
    assert versions[2].metrics["accuracy"] == pytest.approx(1 - 0.375)
    assert "central_s" in versions[1].metrics
    store.close()


def test_receipts_still_flow_with_a_policy(tmp_path: Path) -> None:
    _hub, store = run_hub(tmp_path, FixedSchedule(), None, deltas=[0.1])
    update = store.get_update("u0")
    assert update is not None and update.status == "aggregated"
    store.close()


# -- central steps: more, stop, undo; the central-then-federated schedule -----------------------------


def test_after_central_decisions_on_a_constructed_sequence() -> None:
    policy = AdaptivePolicy(max_central_steps=3, central_min_gain=0.01)
    # held-out metric after the aggregate, then after each central step of one aggregation
    sequence = [0.60, 0.65, 0.70, 0.74]
    actions = [policy.after_central(sequence[i], sequence[i + 1], i + 1).action for i in range(3)]
    assert actions == ["central", "central", "stop"]  # the third step reaches max_central_steps
    assert policy.after_central(0.65, 0.655, 1).action == "stop"  # gained no more than central_min_gain
    assert policy.after_central(0.65, 0.60, 1).action == "undo"  # the step made it worse
    assert AdaptivePolicy(tolerance=0.1).after_central(0.65, 0.60, 1).action == "stop"  # within tolerance
    assert policy.after_central(None, 0.6, 1).action == "stop"  # nothing to compare
    assert all(policy.after_central(0.6, m, 1).reason for m in (0.5, 0.6, 0.7))
    with pytest.raises(ConfigError):
        AdaptivePolicy(max_central_steps=0)
    with pytest.raises(ConfigError):
        AdaptivePolicy(central_min_gain=-0.1)


def test_schedules_say_when_the_central_step_runs() -> None:
    first = make_policy("central-then-federated")
    assert (first.central_first, first.central_after_aggregate) == (True, False)
    after = make_policy("fixed")
    assert (after.central_first, after.central_after_aggregate) == (False, True)
    plain = make_policy("federated-only")
    assert (plain.central_first, plain.central_after_aggregate) == (False, False)
    with pytest.raises(ConfigError):
        FixedSchedule(order="sideways")


def halfway(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """'Training on public data': half-way towards the target."""
    return {"w": (state["w"] + 0.5 * (TARGET - state["w"])).astype(np.float32)}


def run_arrays(
    tmp_path: Path,
    deltas: list[float],
    *,
    settings: HubSettings | None = None,
    policy: SwitchingPolicy | None = None,
    central_step: CentralStep | None = None,
    validate: Metrics | None = None,
    evaluate: Metrics | None = score,
) -> tuple[Hub, SqliteStore]:
    """A hub on plain arrays over the in-memory transport; one update per round (τ = 1) from d1."""
    broker = InMemoryBroker()
    hub_transport = InMemoryTransport(broker, "hub")
    hub_transport.connect()
    store = SqliteStore(tmp_path / "store")
    hub = Hub(
        settings or HubSettings(federation="fed", tau=1),
        hub_transport,
        store,
        initial_state=lambda: {"w": np.zeros(3, np.float32)},
        evaluate=evaluate,
        central_step=central_step,
        policy=policy,
        validate=validate,
    )
    hub.start()
    device = InMemoryTransport(broker, "d1")
    device.connect()
    start = hub.current_version
    for i, value in enumerate(deltas):
        send(device, f"{tmp_path.name}-u{i}-{start}", value, base=hub.current_version)
        deadline = time.monotonic() + 10
        while hub.current_version < start + i + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert hub.wait_idle()
    hub.stop()
    return hub, store


def test_central_then_federated_runs_one_central_step_before_the_first_round(tmp_path: Path) -> None:
    hub, store = run_arrays(tmp_path, [0.1, 0.1], policy=make_policy("central-then-federated"), central_step=halfway)
    versions = store.versions()
    assert [v.kind for v in versions] == ["init", "central", "fedavg", "fedavg"]
    # v1 = central(0) = 0.5, then two federated rounds without central steps: 0.6, 0.7
    np.testing.assert_allclose(hub.global_state()["w"], 0.7, rtol=1e-6)
    assert versions[1].metrics["accuracy"] == pytest.approx(0.5) and versions[1].metrics["central_steps"] == 1
    store.close()
    # a restart does not run the initial central step again (the latest version is no longer "init")
    hub, store = run_arrays(tmp_path, [], policy=make_policy("central-then-federated"), central_step=halfway)
    assert [v.kind for v in store.versions()] == ["init", "central", "fedavg", "fedavg"]
    store.close()


def test_adaptive_runs_more_central_steps_while_they_help(tmp_path: Path) -> None:
    policy = AdaptivePolicy(max_central_steps=3, central_min_gain=0.01)
    hub, store = run_arrays(tmp_path, [0.0], policy=policy, central_step=halfway)
    v1 = store.versions()[1]
    # 0 -> 0.5 -> 0.75 -> 0.875: each step gains, the third reaches the maximum
    assert (v1.kind, v1.metrics["central_steps"]) == ("fedavg+central", 3)
    np.testing.assert_allclose(hub.global_state()["w"], 0.875, rtol=1e-6)
    store.close()


def test_adaptive_undoes_a_central_step_that_hurts(tmp_path: Path) -> None:
    def overshoot(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"w": (state["w"] + 2.0).astype(np.float32)}

    hub, store = run_arrays(tmp_path, [0.5], policy=AdaptivePolicy(max_central_steps=3), central_step=overshoot)
    v1 = store.versions()[1]
    assert (v1.kind, v1.metrics["central_steps"]) == ("fedavg", 0)  # the aggregate is published without it
    np.testing.assert_allclose(hub.global_state()["w"], 0.5, rtol=1e-6)
    store.close()


def test_decisions_use_the_held_out_public_data_not_the_evaluation(tmp_path: Path) -> None:
    def test_split(state: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"accuracy": float(1.0 - np.abs(state["w"] + 1.0).mean())}  # prefers w = -1

    hub, store = run_arrays(
        tmp_path, [0.5, -0.4], policy=AdaptivePolicy(central=False), evaluate=test_split, validate=score
    )
    versions = store.versions()
    # held-out: 0 -> 0.5 better (published; the test split got worse), then 0.1 worse (reverted)
    assert [v.kind for v in versions] == ["init", "fedavg", "reverted"]
    assert versions[1].metrics["heldout_accuracy"] == pytest.approx(0.5)
    assert versions[1].metrics["accuracy"] == pytest.approx(-0.5)
    assert versions[2].metrics["candidate_heldout_accuracy"] == pytest.approx(0.1)
    np.testing.assert_allclose(hub.global_state()["w"], 0.5, rtol=1e-6)
    store.close()


# -- server optimizers in the hub, with their state persisted -------------------------------------------


def test_fedavgm_momentum_survives_a_restart(tmp_path: Path) -> None:
    settings = HubSettings(federation="fed", tau=1, server_optimizer="fedavgm", server_momentum=0.5)
    hub, store = run_arrays(tmp_path, [1.0, 1.0], settings=settings, evaluate=None)
    # u1 = 1, w = 1; u2 = 0.5 * 1 + 1 = 1.5, w = 2.5
    np.testing.assert_allclose(hub.global_state()["w"], 2.5, rtol=1e-6)
    assert [v.kind for v in store.versions()] == ["init", "fedavgm", "fedavgm"]
    assert store.load_server_state(2) is not None
    store.close()
    hub, store = run_arrays(tmp_path, [1.0], settings=settings, evaluate=None)
    # resumed momentum: u3 = 0.5 * 1.5 + 1 = 1.75, w = 4.25 (a fresh buffer would give 3.5)
    np.testing.assert_allclose(hub.global_state()["w"], 4.25, rtol=1e-6)
    store.close()


def test_fedadam_in_the_hub_matches_the_pure_function(tmp_path: Path) -> None:
    from ffm_hub.aggregate import fedadam_step

    settings = HubSettings(federation="fed", tau=1, server_optimizer="fedadam", server_lr=0.1)
    hub, store = run_arrays(tmp_path, [1.0, -0.5], settings=settings, evaluate=None)
    state = {"w": np.zeros(3, np.float32)}
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    for delta in (1.0, -0.5):
        state, m, v = fedadam_step(
            state, {"w": np.full(3, delta, np.float32)}, m, v, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3
        )
    np.testing.assert_allclose(hub.global_state()["w"], state["w"], rtol=1e-6)
    store.close()


def test_a_reverted_step_leaves_no_momentum_behind(tmp_path: Path) -> None:
    settings = HubSettings(federation="fed", tau=1, server_optimizer="fedavgm", server_momentum=0.5)
    hub, store = run_arrays(tmp_path, [1.0, 5.0, -0.5], settings=settings, policy=AdaptivePolicy(central=False))
    # v1: u = 1, w = 1 (the target). v2: u = 5.5, w = 6.5, worse: reverted, u restored to 1.
    # v3: u = 0.5 * 1 - 0.5 = 0, w = 1 (not worse: published). Had u stayed 5.5, w would be 3.25.
    assert [v.kind for v in store.versions()] == ["init", "fedavgm", "reverted", "fedavgm"]
    np.testing.assert_allclose(hub.global_state()["w"], 1.0, rtol=1e-6)
    store.close()


def test_unknown_server_optimizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="server optimizer"):
        HubSettings(server_optimizer="sgd-with-vibes")
    with pytest.raises(ConfigError, match="momentum"):
        HubSettings(server_optimizer="fedavgm", server_momentum=1.5)


# -- a small real model over a real broker -------------------------------------------------------------


def test_switching_on_a_real_model_over_a_real_broker(tmp_path: Path, mqtt_broker: ManagedBroker) -> None:
    """MiniLM + LoRA: a real edge update, real central training on public sentences, and a held-out
    metric replayed from a constructed sequence, so the decisions the hub must reach are known."""
    spec = load_model_spec("minilm-l6-v2")
    task = get_task("sst2")
    hub_trainer = TorchTrainer(spec, task, "lora", seed=0)
    public = sentiment_data(8, seed=1, skew=0.5)
    central_calls = []

    def central(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hub_trainer.load_trainable_state(state)
        hub_trainer.train(public, epochs=1)
        central_calls.append(1)
        return {**state, **hub_trainer.trainable_state()}

    # held-out metric per call: version 0; round 1: aggregate, central 1, central 2; round 2: aggregate,
    # central 1; round 3: aggregate, central 1
    replay = iter([0.50, 0.55, 0.60, 0.605, 0.62, 0.58, 0.55, 0.555])

    def heldout(state: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"accuracy": next(replay)}

    def make(client_id: str) -> MqttTransport:
        return MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"{client_id}-{tmp_path.name}")

    store = SqliteStore(tmp_path / "hub")
    hub_transport = make("hub")
    hub_transport.connect()
    policy = AdaptivePolicy(max_central_steps=3, central_min_gain=0.01)
    hub = Hub(
        HubSettings(federation="sw", model=spec.name, tau=1, chunk_size=16 * 1024),
        hub_transport,
        store,
        initial_state=hub_trainer.trainable_state,
        central_step=central,
        policy=policy,
        validate=heldout,
    )
    hub.start()
    edge = EdgeClient(
        spec,
        sentiment_data(8, seed=2, skew=0.8),
        device_id="e1",
        federation="sw",
        transport=make("e1"),
        codec="fp32",
        state_dir=tmp_path / "e1",
        receipt_timeout=30,
    )
    try:
        with edge:
            results = edge.run_forever(rounds=3)
        assert hub.wait_idle()
    finally:
        hub.stop()
        hub_transport.close()
    assert [r.base_version for r in results] == [0, 1, 2]
    versions = store.versions()
    # round 1: central steps gain 0.05 then 0.005 (stop, 2 kept); published (0.605 > 0.50)
    # round 2: the central step loses (0.62 -> 0.58): undone; the aggregate is published (0.62 > 0.605)
    # round 3: the central step gains 0.005 (no more than the minimum gain: stop); 0.555 < 0.62: reverted
    assert [v.kind for v in versions] == ["init", "fedavg+central", "fedavg", "reverted"]
    assert [v.metrics.get("decision") for v in versions[1:]] == [0, 0, 1]  # publish, publish, revert
    assert [v.metrics.get("central_steps") for v in versions[1:]] == [2, 0, 1]
    assert [v.metrics["heldout_accuracy"] for v in versions] == pytest.approx([0.50, 0.605, 0.62, 0.62])
    assert len(central_calls) == 4 and next(replay, None) is None  # every step and evaluation happened
    # round 2 published the plain aggregate: version 2 = version 1 + the edge's delta (η = 1, τ = 1)
    _m, v1 = decode_global(store.load_version(1))
    _m, v2 = decode_global(store.load_version(2))
    _meta, delta = decode_update(store.load_update(results[1].update_id))
    for name, value in delta.items():
        np.testing.assert_allclose(v2[name], v1[name] + value, rtol=1e-5, atol=1e-6)
    _m, v3 = decode_global(store.load_version(3))
    for name in v2:  # the reverted version is the previous one, unchanged
        np.testing.assert_array_equal(v3[name], v2[name])
    store.close()
