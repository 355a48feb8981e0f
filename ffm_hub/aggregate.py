"""Aggregation as pure functions over arrays (the paper's Algorithm 1), with a thin strategy layer.

FedAvg here is ``w_t = w_{t-1} + eta * sum_k p_k * delta_k`` with ``p_k = n_k / sum_j n_j`` taken per
tensor over the updates that carry that tensor, so devices on different strategies can share one
federation. The weighted sums are kept as :class:`PartialSum` objects, which merge associatively: a
regional hub can pre-aggregate and a central one merge, with the same result.

On top of the weighted mean delta (the *pseudo-gradient* of Reddi et al. 2021, "Adaptive Federated
Optimization", taken as ``new - old`` so it is *added*) sit server optimizers, written as pure functions
with explicit state (:func:`fedavgm_step`, :func:`fedadam_step`) and wrapped by small dataclass
strategies (:class:`FedAvg`, :class:`FedAvgM`, :class:`FedAdam`) whose buffers persist as arrays through
``state_dict()`` / ``load_state_dict()``. Asynchronous aggregation down-weights stale updates with
:func:`staleness_weight` (FedAsync, Xie et al. 2019) and drops those :func:`is_too_stale`.

Staleness: an update trained on global version ``v`` and aggregated into version ``t`` has staleness
``t - 1 - v``. Synchronous FedAvg aggregates updates built on ``t - 1`` into ``t``, so their staleness is 0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ffm_edge.errors import ConfigError

__all__ = [
    "STALENESS_KINDS",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "PartialSum",
    "ServerOptimizer",
    "apply_delta",
    "fedadam_step",
    "fedavg",
    "fedavgm_step",
    "is_too_stale",
    "make_server_optimizer",
    "staleness_weight",
    "weighted_mean",
]


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


# -- staleness ----------------------------------------------------------------------------------------

STALENESS_KINDS = ("constant", "polynomial", "hinge")


def _check_staleness(staleness: int, what: str = "staleness") -> int:
    if isinstance(staleness, bool) or not isinstance(staleness, int | np.integer) or staleness < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {staleness!r}")
    return int(staleness)


def is_too_stale(staleness: int, max_staleness: int | None) -> bool:
    """Whether an update of this staleness is to be dropped: ``staleness > max_staleness``.

    ``max_staleness=None`` means no cut-off. Staleness is ``t - 1 - v`` for an update built on version
    ``v`` and aggregated into version ``t`` (0 for synchronous FedAvg).
    """
    s = _check_staleness(staleness)
    if max_staleness is None:
        return False
    return s > _check_staleness(max_staleness, "max_staleness")


def staleness_weight(
    staleness: int,
    *,
    kind: str = "polynomial",
    alpha: float = 0.5,
    max_staleness: int | None = None,
    hinge_b: int = 4,
) -> float:
    """The FedAsync mixing factor ``s(staleness)`` in ``[0, 1]`` that scales a stale update's weight.

    ``staleness`` is ``t - 1 - v`` for an update built on global version ``v`` and aggregated into
    version ``t`` (0 for synchronous FedAvg, where every kind gives 1). Kinds, after Xie et al. 2019:

    * ``"constant"``: ``1`` whatever the staleness (``alpha`` is ignored);
    * ``"polynomial"``: ``(1 + s) ** -alpha`` with ``alpha >= 0`` (larger ``alpha`` forgets faster);
    * ``"hinge"``: ``1`` while ``s <= b``, then ``1 / (a * (s - b) + 1)``, with slope ``a = alpha >= 0``
      and grace period ``b = hinge_b >= 0`` staleness steps.

    With ``max_staleness`` set, an update that :func:`is_too_stale` gets weight ``0.0`` (drop it).
    Bad arguments raise :class:`~ffm_edge.errors.ConfigError`.
    """
    s = _check_staleness(staleness)
    if kind not in STALENESS_KINDS:
        raise ConfigError(f"staleness kind must be one of {STALENESS_KINDS}, got {kind!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"staleness alpha must be a finite number >= 0, got {alpha!r}")
    b = _check_staleness(hinge_b, "hinge_b")
    if is_too_stale(s, max_staleness):
        return 0.0
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + s) ** -float(alpha))
    return 1.0 if s <= b else 1.0 / (float(alpha) * (s - b) + 1.0)


# -- server optimizers as pure functions ---------------------------------------------------------------


def _check_real(name: str, value: float, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high)`` (``(low, high)`` when ``low_open``), else ConfigError."""
    ok = not isinstance(value, bool) and isinstance(value, int | float | np.floating | np.integer)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and v < high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high})"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _check_lr(server_lr: float) -> float:
    return _check_real("server_lr", server_lr, low=0.0, low_open=True)


def _check_beta(name: str, beta: float) -> float:
    return _check_real(name, beta, low=0.0, high=1.0)


def _prepare(state: Mapping[str, np.ndarray], pseudo_gradient: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A float32 copy of ``state``, after checking ``pseudo_gradient`` names and shapes against it."""
    unknown = set(pseudo_gradient) - set(state)
    if unknown:
        raise ValueError(f"pseudo-gradient has tensors the state does not: {sorted(unknown)[:3]}")
    for name, value in pseudo_gradient.items():
        if np.shape(value) != np.shape(state[name]):
            raise ValueError(f"{name}: pseudo-gradient shape {np.shape(value)} != state {np.shape(state[name])}")
    return {name: np.array(value, dtype=np.float32, copy=True) for name, value in state.items()}


def _buffer(buffers: Mapping[str, np.ndarray], name: str, like: np.ndarray, what: str) -> np.ndarray:
    """``buffers[name]`` in float64, or zeros shaped like ``like`` when absent."""
    if name not in buffers:
        return np.zeros(np.shape(like), dtype=np.float64)
    value = np.asarray(buffers[name], dtype=np.float64)
    if value.shape != np.shape(like):
        raise ValueError(f"{name}: {what} shape {value.shape} != {np.shape(like)}")
    return value


def _copy32(buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.array(value, dtype=np.float32, copy=True) for name, value in buffers.items()}


def fedavgm_step(
    state: Mapping[str, np.ndarray],
    pseudo_gradient: Mapping[str, np.ndarray],
    momentum_buffer: Mapping[str, np.ndarray],
    *,
    server_lr: float,
    momentum: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One FedAvgM server step (Hsu et al. 2019; Reddi et al. 2021): returns ``(new_state, new_buffer)``.

    For each tensor in ``pseudo_gradient`` (the weighted mean delta, ``new - old``):
    ``u = momentum * u + delta`` and ``x = x + server_lr * u``, with a missing buffer entry taken as
    zeros. Tensors absent from ``pseudo_gradient`` keep their state and their buffer unchanged.
    Computed in float64, returned as float32; the inputs are not modified.
    """
    lr = _check_lr(server_lr)
    beta = _check_beta("momentum", momentum)
    out = _prepare(state, pseudo_gradient)
    buffer = _copy32(momentum_buffer)
    for name, value in pseudo_gradient.items():
        u = beta * _buffer(momentum_buffer, name, value, "momentum buffer") + np.asarray(value, dtype=np.float64)
        out[name] = (out[name].astype(np.float64) + lr * u).astype(np.float32)
        buffer[name] = u.astype(np.float32)
    return out, buffer


def fedadam_step(
    state: Mapping[str, np.ndarray],
    pseudo_gradient: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    *,
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One FedAdam server step (Reddi et al. 2021, Algorithm 2): returns ``(new_state, new_m, new_v)``.

    For each tensor in ``pseudo_gradient`` (the weighted mean delta ``D``, ``new - old``):
    ``m = beta1 * m + (1 - beta1) * D``, ``v = beta2 * v + (1 - beta2) * D**2`` and
    ``x = x + server_lr * m / (sqrt(v) + tau)``; no bias correction, as in the paper. Missing moment
    entries are taken as zeros. Tensors absent from ``pseudo_gradient`` keep their state and moments.
    Computed in float64, returned as float32; the inputs are not modified.
    """
    lr = _check_lr(server_lr)
    b1 = _check_beta("beta1", beta1)
    b2 = _check_beta("beta2", beta2)
    eps = _check_real("tau", tau, low=0.0, low_open=True)
    out = _prepare(state, pseudo_gradient)
    new_m, new_v = _copy32(m), _copy32(v)
    for name, value in pseudo_gradient.items():
        delta = np.asarray(value, dtype=np.float64)
        m_t = b1 * _buffer(m, name, value, "first moment") + (1.0 - b1) * delta
        v_t = b2 * _buffer(v, name, value, "second moment") + (1.0 - b2) * np.square(delta)
        out[name] = (out[name].astype(np.float64) + lr * m_t / (np.sqrt(v_t) + eps)).astype(np.float32)
        new_m[name] = m_t.astype(np.float32)
        new_v[name] = v_t.astype(np.float32)
    return out, new_m, new_v


# -- the thin strategy layer ---------------------------------------------------------------------------


class ServerOptimizer(ABC):
    """A server optimizer: turns the weighted mean delta into the next global state.

    Implementations are dataclass configs (validated on construction) holding their buffers, which
    ``state_dict()`` exposes as flat ``{"<buffer>/<tensor>": array}`` so the hub can persist them.
    """

    name: ClassVar[str]
    _buffers: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def step(self, state: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global state; ``state`` and ``mean_delta`` are not modified."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the optimizer buffers as ``{"<buffer>/<tensor>": float32 array}``."""
        out: dict[str, np.ndarray] = {}
        for buffer in self._buffers:
            for tensor, value in getattr(self, buffer).items():
                out[f"{buffer}/{tensor}"] = np.array(value, dtype=np.float32, copy=True)
        return out

    def load_state_dict(self, state_dict: Mapping[str, np.ndarray]) -> None:
        """Replace the buffers with copies of those in ``state_dict`` (as written by :meth:`state_dict`)."""
        loaded: dict[str, dict[str, np.ndarray]] = {buffer: {} for buffer in self._buffers}
        for key, value in state_dict.items():
            buffer, sep, tensor = key.partition("/")
            if not sep or not tensor or buffer not in loaded:
                raise ValueError(f"{type(self).__name__}: unexpected optimizer state key {key!r}")
            loaded[buffer][tensor] = np.array(value, dtype=np.float32, copy=True)
        for buffer, values in loaded.items():
            setattr(self, buffer, values)


@dataclass
class FedAvg(ServerOptimizer):
    """Plain FedAvg: ``x = x + server_lr * mean_delta`` (no state); same as :func:`apply_delta`."""

    name: ClassVar[str] = "fedavg"

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        self.server_lr = _check_lr(self.server_lr)

    def step(self, state: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return apply_delta(state, mean_delta, self.server_lr)


@dataclass
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (:func:`fedavgm_step`); ``momentum`` in ``[0, 1)``."""

    name: ClassVar[str] = "fedavgm"
    _buffers: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    server_lr: float = 1.0
    momentum: float = 0.9
    momentum_buffer: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.server_lr = _check_lr(self.server_lr)
        self.momentum = _check_beta("momentum", self.momentum)

    def step(self, state: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        new_state, self.momentum_buffer = fedavgm_step(
            state, mean_delta, self.momentum_buffer, server_lr=self.server_lr, momentum=self.momentum
        )
        return new_state


@dataclass
class FedAdam(ServerOptimizer):
    """FedAdam (:func:`fedadam_step`); defaults follow Reddi et al. 2021 (``beta2=0.99``, ``tau=1e-3``)."""

    name: ClassVar[str] = "fedadam"
    _buffers: ClassVar[tuple[str, ...]] = ("m", "v")

    server_lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    v: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.server_lr = _check_lr(self.server_lr)
        self.beta1 = _check_beta("beta1", self.beta1)
        self.beta2 = _check_beta("beta2", self.beta2)
        self.tau = _check_real("tau", self.tau, low=0.0, low_open=True)

    def step(self, state: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        new_state, self.m, self.v = fedadam_step(
            state,
            mean_delta,
            self.m,
            self.v,
            server_lr=self.server_lr,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        return new_state


_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam)}


def make_server_optimizer(name: str, **kwargs: Any) -> ServerOptimizer:
    """A server optimizer by name (``"fedavg"``, ``"fedavgm"``, ``"fedadam"``; case-insensitive).

    Unknown names or arguments, and invalid values, raise :class:`~ffm_edge.errors.ConfigError`.
    """
    cls = _OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"server optimizer must be one of {sorted(_OPTIMIZERS)}, got {name!r}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.name}: {exc}") from exc
