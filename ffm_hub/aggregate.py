"""Aggregation as pure functions over arrays (the paper's Algorithm 1).

FedAvg here is ``w_t = w_{t-1} + eta * sum_k p_k * delta_k`` with ``p_k = n_k / sum_j n_j`` taken per
tensor over the updates that carry that tensor, so devices on different strategies can share one
federation. The weighted sums are kept as :class:`PartialSum` objects, which merge associatively: a
regional hub can pre-aggregate and a central one merge, with the same result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PartialSum", "apply_delta", "fedavg", "weighted_mean"]


@dataclass
class PartialSum:
    """Running ``sum_k w_k * delta_k`` and ``sum_k w_k`` per tensor, accumulated in float64."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> PartialSum:
        """Add one update with weight ``weight`` (its sample count for FedAvg)."""
        if not weight > 0 or not np.isfinite(weight):
            raise ValueError(f"update weight must be a positive finite number, got {weight}")
        for name, value in delta.items():
            contribution = np.asarray(value, dtype=np.float64) * weight
            if name in self.sums:
                if self.sums[name].shape != contribution.shape:
                    raise ValueError(f"{name}: shape {contribution.shape} != {self.sums[name].shape}")
                self.sums[name] += contribution
                self.weights[name] += weight
            else:
                self.sums[name] = contribution
                self.weights[name] = weight
        self.count += 1
        return self

    def merge(self, other: PartialSum) -> PartialSum:
        """A new partial sum holding both (associative and commutative)."""
        merged = PartialSum({k: v.copy() for k, v in self.sums.items()}, dict(self.weights), self.count)
        for name, value in other.sums.items():
            if name in merged.sums:
                merged.sums[name] += value
                merged.weights[name] += other.weights[name]
            else:
                merged.sums[name] = value.copy()
                merged.weights[name] = other.weights[name]
        merged.count += other.count
        return merged

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean per tensor, over the updates that carried it."""
        return {name: (total / self.weights[name]).astype(np.float32) for name, total in self.sums.items()}


def weighted_mean(deltas: Iterable[Mapping[str, np.ndarray]], weights: Iterable[float]) -> dict[str, np.ndarray]:
    """``sum_k w_k x_k / sum_k w_k`` per tensor."""
    partial = PartialSum()
    for delta, weight in zip(deltas, weights, strict=True):
        partial.add(delta, weight)
    return partial.mean()


def apply_delta(
    state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """``state + server_lr * delta``; tensors absent from ``delta`` are kept as they are."""
    unknown = set(delta) - set(state)
    if unknown:
        raise ValueError(f"delta has tensors the state does not: {sorted(unknown)[:3]}")
    out = {name: np.array(value, dtype=np.float32, copy=True) for name, value in state.items()}
    for name, value in delta.items():
        out[name] = (out[name].astype(np.float64) + server_lr * value.astype(np.float64)).astype(np.float32)
    return out


def fedavg(
    state: Mapping[str, np.ndarray],
    deltas: Iterable[Mapping[str, np.ndarray]],
    num_samples: Iterable[int],
    server_lr: float = 1.0,
) -> dict[str, np.ndarray]:
    """One FedAvg server step: sample-weighted mean of the deltas, scaled by ``server_lr``."""
    return apply_delta(state, weighted_mean(deltas, [float(n) for n in num_samples]), server_lr)
