"""Switching between federated and central optimization: policies on constructed metric sequences, and
the hub applying them (central step, revert, down-weight) on plain arrays."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ffm_edge.errors import ConfigError
from ffm_edge.transport import InMemoryBroker, InMemoryTransport
from ffm_edge.wire import Topics, UpdateMeta, encode_update, split_frame
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore
from ffm_hub.switching import AdaptivePolicy, FixedSchedule, make_policy


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


def score(state: dict[str, np.ndarray]) -> dict[str, float]:
    """A held-out 'accuracy' that is best when every weight equals TARGET."""
    return {"accuracy": float(1.0 - np.abs(state["w"] - TARGET).mean())}


def send(transport: InMemoryTransport, update_id: str, value: float, base: int) -> None:
    meta = UpdateMeta("fed", "d1", update_id, base, "lora", 10, "fp32", time.time())
    frame = encode_update(meta, {"w": np.full(3, value, np.float32)})
    for chunk in split_frame(frame, chunk_size=1024, transfer_id=update_id):
        transport.publish(Topics("fed").uplink_update("d1"), chunk)


def run_hub(tmp_path: Path, policy: object, central_step: object, deltas: list[float]) -> tuple[Hub, SqliteStore]:
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
        central_step=central_step,  # type: ignore[arg-type]
        policy=policy,  # type: ignore[arg-type]
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
    assert store.get_update("u0") is not None and store.get_update("u0").status == "aggregated"
    store.close()
