"""FedAvg and partial sums against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from ffm_hub.aggregate import PartialSum, apply_delta, fedavg, weighted_mean


def test_weighted_mean_by_hand() -> None:
    # (1*10 + 4*30) / 40 = 3.25 ; (2*10 + 0*30) / 40 = 0.5
    deltas = [{"w": np.array([1.0, 2.0])}, {"w": np.array([4.0, 0.0])}]
    out = weighted_mean(deltas, [10, 30])
    np.testing.assert_allclose(out["w"], [3.25, 0.5])
    assert out["w"].dtype == np.float32


def test_fedavg_with_server_learning_rate_by_hand() -> None:
    state = {"a": np.array([[1.0, 1.0]]), "b": np.array([5.0])}
    deltas = [{"a": np.array([[2.0, 0.0]]), "b": np.array([1.0])}, {"a": np.array([[0.0, 4.0]]), "b": np.array([3.0])}]
    # weights 1 and 3: mean a = [0.5, 3.0], mean b = 2.5; eta = 0.5
    out = fedavg(state, deltas, [1, 3], server_lr=0.5)
    np.testing.assert_allclose(out["a"], [[1.25, 2.5]])
    np.testing.assert_allclose(out["b"], [6.25])


def test_per_tensor_mean_over_the_updates_that_carry_it() -> None:
    # Mixed strategies: only the second device trained "head".
    deltas = [{"lora": np.array([2.0])}, {"lora": np.array([4.0]), "head": np.array([10.0])}]
    out = weighted_mean(deltas, [1, 1])
    np.testing.assert_allclose(out["lora"], [3.0])
    np.testing.assert_allclose(out["head"], [10.0])  # not diluted by the device that lacked it


def test_partial_sums_merge_like_one_sum() -> None:
    rng = np.random.default_rng(0)
    updates = [{"x": rng.normal(size=(3, 2))} for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    whole = weighted_mean(updates, weights)
    left = PartialSum()
    right = PartialSum()
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        (left if i < 2 else right).add(u, w)
    merged = right.merge(left).mean()
    np.testing.assert_allclose(merged["x"], whole["x"], rtol=1e-6)
    assert right.merge(left).count == 5


def test_apply_delta_keeps_untouched_tensors_and_rejects_unknown() -> None:
    state = {"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)}
    out = apply_delta(state, {"a": np.array([1.0, 2.0])})
    np.testing.assert_array_equal(out["b"], [1.0, 1.0])
    np.testing.assert_array_equal(out["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="tensors the state does not"):
        apply_delta(state, {"c": np.zeros(1)})


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_weights_are_refused(weight: float) -> None:
    with pytest.raises(ValueError):
        PartialSum().add({"a": np.zeros(1)}, weight)


def test_shape_conflict_is_refused() -> None:
    partial = PartialSum().add({"a": np.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        partial.add({"a": np.zeros(3)}, 1.0)
