"""FedAvg, partial sums, staleness weights and server optimizers against hand-computed numbers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from ffm_edge.errors import ConfigError
from ffm_hub.aggregate import (
    FedAdam,
    FedAvg,
    FedAvgM,
    PartialSum,
    ServerOptimizer,
    apply_delta,
    fedadam_step,
    fedavg,
    fedavgm_step,
    is_too_stale,
    make_server_optimizer,
    staleness_weight,
    weighted_mean,
)


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


# -- staleness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("staleness", [0, 1, 5, 100])
def test_constant_staleness_is_one(staleness: int) -> None:
    assert staleness_weight(staleness, kind="constant", alpha=3.0) == 1.0


@pytest.mark.parametrize(
    ("staleness", "alpha", "expected"),
    [
        (0, 0.5, 1.0),  # (1 + 0)^-0.5 = 1
        (3, 0.5, 0.5),  # (1 + 3)^-0.5 = 1/2
        (8, 0.5, 1 / 3),  # (1 + 8)^-0.5 = 1/3
        (1, 1.0, 0.5),  # (1 + 1)^-1 = 1/2
        (7, 0.0, 1.0),  # alpha = 0: no decay
    ],
)
def test_polynomial_staleness_by_hand(staleness: int, alpha: float, expected: float) -> None:
    assert staleness_weight(staleness, kind="polynomial", alpha=alpha) == pytest.approx(expected)


def test_polynomial_is_the_default() -> None:
    assert staleness_weight(3) == pytest.approx(0.5)  # (1 + 3)^-0.5


@pytest.mark.parametrize(
    ("staleness", "alpha", "b", "expected"),
    [
        (0, 10.0, 4, 1.0),  # s <= b
        (4, 10.0, 4, 1.0),  # s == b: still 1
        (5, 10.0, 4, 1 / 11),  # 1 / (10 * (5 - 4) + 1)
        (6, 10.0, 4, 1 / 21),  # 1 / (10 * (6 - 4) + 1)
        (6, 0.5, 2, 1 / 3),  # 1 / (0.5 * (6 - 2) + 1)
        (1, 2.0, 0, 1 / 3),  # 1 / (2 * (1 - 0) + 1)
    ],
)
def test_hinge_staleness_by_hand(staleness: int, alpha: float, b: int, expected: float) -> None:
    assert staleness_weight(staleness, kind="hinge", alpha=alpha, hinge_b=b) == pytest.approx(expected)


def test_max_staleness_cuts_off() -> None:
    # max_staleness = 3: s = 3 is kept with (1 + 3)^-0.5 = 0.5, s = 4 is dropped (weight 0).
    assert staleness_weight(3, max_staleness=3) == pytest.approx(0.5)
    assert staleness_weight(4, max_staleness=3) == 0.0
    assert staleness_weight(4, kind="constant", max_staleness=3) == 0.0
    assert staleness_weight(0, kind="hinge", max_staleness=0) == 1.0
    assert not is_too_stale(3, 3)
    assert is_too_stale(4, 3)
    assert is_too_stale(1, 0)
    assert not is_too_stale(10**6, None)


def test_synchronous_update_has_staleness_zero_and_full_weight() -> None:
    # Built on version v = 6, aggregated into t = 7: staleness t - 1 - v = 0 -> weight 1 for every kind.
    staleness = 7 - 1 - 6
    for kind in ("constant", "polynomial", "hinge"):
        assert staleness_weight(staleness, kind=kind, alpha=10.0, hinge_b=0) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"staleness": -1},
        {"staleness": 1.5},
        {"staleness": True},
        {"staleness": 1, "kind": "linear"},
        {"staleness": 1, "alpha": -0.1},
        {"staleness": 1, "alpha": float("nan")},
        {"staleness": 1, "alpha": float("inf")},
        {"staleness": 1, "max_staleness": -1},
        {"staleness": 1, "kind": "hinge", "hinge_b": -1},
    ],
)
def test_staleness_arguments_are_validated(kwargs: dict[str, Any]) -> None:
    staleness = kwargs.pop("staleness")
    with pytest.raises(ConfigError):
        staleness_weight(staleness, **kwargs)


def test_is_too_stale_validates() -> None:
    with pytest.raises(ConfigError):
        is_too_stale(-1, 3)
    with pytest.raises(ConfigError):
        is_too_stale(1, -3)


# -- server optimizers ------------------------------------------------------------------------------------


def test_fedavgm_two_steps_by_hand() -> None:
    # server_lr = 0.5, momentum = 0.5, x0 = [1, 2], empty buffer (zeros).
    # step 1: d = [2, -4]; u = 0.5*0 + d = [2, -4];           x = [1, 2] + 0.5*[2, -4] = [2, 0]
    # step 2: d = [1, 2];  u = 0.5*[2, -4] + [1, 2] = [2, 0]; x = [2, 0] + 0.5*[2, 0]  = [3, 0]
    x0 = {"w": np.array([1.0, 2.0], np.float32)}
    x1, u1 = fedavgm_step(x0, {"w": np.array([2.0, -4.0])}, {}, server_lr=0.5, momentum=0.5)
    np.testing.assert_allclose(x1["w"], [2.0, 0.0])
    np.testing.assert_allclose(u1["w"], [2.0, -4.0])
    x2, u2 = fedavgm_step(x1, {"w": np.array([1.0, 2.0])}, u1, server_lr=0.5, momentum=0.5)
    np.testing.assert_allclose(x2["w"], [3.0, 0.0])
    np.testing.assert_allclose(u2["w"], [2.0, 0.0])
    assert x2["w"].dtype == np.float32 and u2["w"].dtype == np.float32
    np.testing.assert_array_equal(u1["w"], [2.0, -4.0])  # inputs not modified
    np.testing.assert_array_equal(x0["w"], [1.0, 2.0])


def test_fedadam_two_steps_by_hand() -> None:
    # server_lr = 1, beta1 = 0.5, beta2 = 0.75, tau = 1, x0 = [0, 0], m = v = 0.
    # step 1: d = [4, -2]; m = 0.5*[4, -2] = [2, -1]; v = 0.25*[16, 4] = [4, 1]
    #         x = [0, 0] + [2/(2+1), -1/(1+1)] = [2/3, -1/2]
    # step 2: d = [0, 2];  m = 0.5*[2, -1] + 0.5*[0, 2] = [1, 0.5]; v = 0.75*[4, 1] + 0.25*[0, 4] = [3, 1.75]
    #         x = [2/3 + 1/(sqrt(3)+1), -1/2 + 0.5/(sqrt(1.75)+1)] = [1.0326921, -0.2847496]
    hyper = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.75, "tau": 1.0}
    x0 = {"w": np.zeros(2, np.float32)}
    x1, m1, v1 = fedadam_step(x0, {"w": np.array([4.0, -2.0])}, {}, {}, **hyper)
    np.testing.assert_allclose(m1["w"], [2.0, -1.0])
    np.testing.assert_allclose(v1["w"], [4.0, 1.0])
    np.testing.assert_allclose(x1["w"], [2 / 3, -0.5], rtol=1e-6)
    x2, m2, v2 = fedadam_step(x1, {"w": np.array([0.0, 2.0])}, m1, v1, **hyper)
    np.testing.assert_allclose(m2["w"], [1.0, 0.5])
    np.testing.assert_allclose(v2["w"], [3.0, 1.75])
    expected = [2 / 3 + 1 / (math.sqrt(3) + 1), -0.5 + 0.5 / (math.sqrt(1.75) + 1)]
    np.testing.assert_allclose(x2["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(x2["w"], [1.0326921, -0.2847496], rtol=1e-6)
    assert {x2["w"].dtype, m2["w"].dtype, v2["w"].dtype} == {np.dtype(np.float32)}


def test_absent_tensors_keep_state_and_buffers() -> None:
    state = {"a": np.array([1.0], np.float32), "frozen": np.array([7.0], np.float32)}
    delta = {"a": np.array([2.0])}
    # FedAvgM: "frozen" has a buffer [3] but no delta: neither the state nor the buffer moves (no decay).
    x, u = fedavgm_step(state, delta, {"frozen": np.array([3.0])}, server_lr=1.0, momentum=0.5)
    np.testing.assert_array_equal(x["frozen"], [7.0])
    np.testing.assert_array_equal(u["frozen"], [3.0])
    np.testing.assert_allclose(x["a"], [3.0])  # 1 + 1*(0.5*0 + 2)
    # FedAdam: the same for both moments.
    m0 = {"frozen": np.array([0.25])}
    v0 = {"frozen": np.array([4.0])}
    x, m, v = fedadam_step(state, delta, m0, v0, server_lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    np.testing.assert_array_equal(x["frozen"], [7.0])
    np.testing.assert_array_equal(m["frozen"], [0.25])
    np.testing.assert_array_equal(v["frozen"], [4.0])
    assert m["frozen"] is not m0["frozen"]  # a copy, not shared
    # The strategy layer keeps them too.
    opt = FedAdam(server_lr=1.0)
    opt.step(state, {"frozen": np.array([1.0])})
    opt.step(state, delta)
    assert set(opt.m) == {"a", "frozen"}


def test_unknown_or_misshapen_tensors_are_refused() -> None:
    state = {"a": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="tensors the state does not"):
        fedavgm_step(state, {"b": np.zeros(2)}, {}, server_lr=1.0, momentum=0.9)
    with pytest.raises(ValueError, match="shape"):
        fedadam_step(state, {"a": np.zeros(3)}, {}, {}, server_lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    with pytest.raises(ValueError, match="shape"):
        fedavgm_step(state, {"a": np.zeros(2)}, {"a": np.zeros(3)}, server_lr=1.0, momentum=0.9)


def test_fedavg_strategy_equals_apply_delta() -> None:
    rng = np.random.default_rng(1)
    state = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    delta = {"a": rng.normal(size=(3, 2)).astype(np.float32)}
    out = FedAvg(server_lr=0.7).step(state, delta)
    expected = apply_delta(state, delta, 0.7)
    for name in state:
        np.testing.assert_array_equal(out[name], expected[name])
    assert FedAvg().state_dict() == {}
    # FedAvgM's first step from an empty buffer is FedAvg too: u = d, x = x + eta*d.
    first = FedAvgM(server_lr=0.7, momentum=0.9).step(state, delta)
    np.testing.assert_array_equal(first["a"], expected["a"])


@pytest.mark.parametrize(
    "make",
    [lambda: FedAvgM(server_lr=0.3, momentum=0.8), lambda: FedAdam(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)],
)
def test_state_dict_round_trip_reproduces_the_next_step(make: Any) -> None:
    rng = np.random.default_rng(2)
    state = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    d1 = {name: rng.normal(size=value.shape) for name, value in state.items()}
    d2 = {"a": rng.normal(size=(2, 3))}
    original: ServerOptimizer = make()
    x1 = original.step(state, d1)
    saved = original.state_dict()
    assert all(isinstance(value, np.ndarray) for value in saved.values())
    restored: ServerOptimizer = make()
    restored.load_state_dict(saved)
    next(iter(saved.values()))[...] = 123.0  # restored holds copies, not these arrays
    x2 = original.step(x1, d2)
    y2 = restored.step(x1, d2)
    for name in state:
        np.testing.assert_array_equal(x2[name], y2[name])
    assert {k: v.tolist() for k, v in original.state_dict().items()} == {
        k: v.tolist() for k, v in restored.state_dict().items()
    }


def test_state_dict_keys_and_bad_keys() -> None:
    opt = FedAdam()
    opt.step({"w": np.zeros(1, np.float32)}, {"w": np.ones(1)})
    assert sorted(opt.state_dict()) == ["m/w", "v/w"]
    momentum = FedAvgM()
    momentum.step({"w": np.zeros(1, np.float32)}, {"w": np.ones(1)})
    assert sorted(momentum.state_dict()) == ["momentum_buffer/w"]
    with pytest.raises(ValueError, match="unexpected"):
        opt.load_state_dict({"momentum_buffer/w": np.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        FedAvg().load_state_dict({"m/w": np.zeros(1)})


def test_make_server_optimizer() -> None:
    opt = make_server_optimizer("FedAdam", server_lr=0.01, tau=1e-4)
    assert isinstance(opt, FedAdam) and opt.server_lr == 0.01 and opt.tau == 1e-4 and opt.beta1 == 0.9
    assert isinstance(make_server_optimizer("fedavg"), FedAvg)
    assert make_server_optimizer("fedavgm", momentum=0.5) == FedAvgM(server_lr=1.0, momentum=0.5)
    with pytest.raises(ConfigError, match="one of"):
        make_server_optimizer("sgd")
    with pytest.raises(ConfigError):
        make_server_optimizer("fedavg", momentum=0.9)  # not a FedAvg argument
    with pytest.raises(ConfigError):
        make_server_optimizer("fedavgm", momentum_buffer={})  # state, not config


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (FedAvg, {"server_lr": 0.0}),
        (FedAvg, {"server_lr": -1.0}),
        (FedAvg, {"server_lr": float("nan")}),
        (FedAvgM, {"momentum": 1.0}),
        (FedAvgM, {"momentum": -0.1}),
        (FedAvgM, {"server_lr": float("inf")}),
        (FedAdam, {"beta1": 1.0}),
        (FedAdam, {"beta2": -0.5}),
        (FedAdam, {"tau": 0.0}),
        (FedAdam, {"server_lr": "0.1"}),
    ],
)
def test_optimizer_configs_are_validated(cls: type[ServerOptimizer], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_pure_steps_validate_hyperparameters() -> None:
    state = {"w": np.zeros(1, np.float32)}
    delta = {"w": np.ones(1)}
    with pytest.raises(ConfigError):
        fedavgm_step(state, delta, {}, server_lr=0.0, momentum=0.9)
    with pytest.raises(ConfigError):
        fedavgm_step(state, delta, {}, server_lr=1.0, momentum=1.5)
    with pytest.raises(ConfigError):
        fedadam_step(state, delta, {}, {}, server_lr=1.0, beta1=0.9, beta2=1.0, tau=1e-3)
    with pytest.raises(ConfigError):
        fedadam_step(state, delta, {}, {}, server_lr=1.0, beta1=0.9, beta2=0.99, tau=-1.0)
