"""Robust and private aggregation rules as pure functions over arrays (issue 7, part 4).

Each rule turns the queued deltas (``Mapping[str, np.ndarray]``, ``new - old``) into one pseudo-gradient
that replaces the weighted mean of :mod:`ffm_hub.aggregate` before the server optimizer's η step. They
are *unweighted*: an attacker controls its own sample count, so letting ``n_k`` weigh in would hand it
the aggregate; staleness weights are not applied either (``max_staleness`` still rejects old updates).

* :func:`coordinate_median` and :func:`trimmed_mean` work coordinate by coordinate, per tensor over the
  updates that carry it, so a mixed-strategy federation works as with FedAvg.
* :func:`krum_scores` / :func:`krum_select` / :func:`multi_krum` (Blanchard et al. 2017) measure whole
  updates against each other and so *refuse* updates with different tensor sets or shapes.
* :func:`dp_fedavg` (central DP-FedAvg, McMahan et al. 2018) clips each whole update to L2 norm ``C``,
  sums and divides by the fixed ``τ`` (number of updates) — a tensor an update lacks counts as zero there,
  which keeps one update's influence on the mean at most ``C / τ`` — and adds ``N(0, σ²)`` with
  ``σ = z · C / τ`` to every coordinate.

Everything is computed in float64 and returned as float32, like :mod:`ffm_hub.aggregate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ffm_edge.errors import ConfigError

__all__ = [
    "AGGREGATORS",
    "DPResult",
    "check_aggregator",
    "clip_update",
    "coordinate_median",
    "dp_fedavg",
    "dp_noise_std",
    "krum_scores",
    "krum_select",
    "multi_krum",
    "robust_aggregate",
    "trimmed_mean",
    "update_norm",
]

#: Names of the aggregation rules the hub knows; ``fedavg`` is the sample-weighted mean of aggregate.py.
AGGREGATORS = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "dp_fedavg")

Delta = Mapping[str, np.ndarray]


def _check_deltas(deltas: Sequence[Delta]) -> list[Delta]:
    updates = list(deltas)
    if not updates:
        raise ConfigError("robust aggregation needs at least one update, got none")
    return updates


def _per_tensor(deltas: Sequence[Delta]) -> dict[str, np.ndarray]:
    """``{name: stacked float64 array (k, *shape)}`` over the updates that carry each tensor."""
    stacks: dict[str, list[np.ndarray]] = {}
    for delta in deltas:
        for name, value in delta.items():
            arr = np.asarray(value, dtype=np.float64)
            if name in stacks and stacks[name][0].shape != arr.shape:
                raise ValueError(f"{name}: shape {arr.shape} != {stacks[name][0].shape}")
            stacks.setdefault(name, []).append(arr)
    return {name: np.stack(values) for name, values in stacks.items()}


def coordinate_median(deltas: Sequence[Delta]) -> dict[str, np.ndarray]:
    """The coordinate-wise median (Yin et al. 2018), per tensor over the updates that carry it.

    With an even count the median is the mean of the two middle values (numpy's convention).
    """
    return {
        name: np.median(stack, axis=0).astype(np.float32) for name, stack in _per_tensor(_check_deltas(deltas)).items()
    }


def _check_fraction(trim_fraction: float) -> float:
    ok = not isinstance(trim_fraction, bool) and isinstance(trim_fraction, int | float | np.floating)
    if not ok or not math.isfinite(float(trim_fraction)) or not 0.0 <= float(trim_fraction) < 0.5:
        raise ConfigError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")
    return float(trim_fraction)


def trimmed_mean(deltas: Sequence[Delta], trim_fraction: float) -> dict[str, np.ndarray]:
    """The coordinate-wise β-trimmed mean (Yin et al. 2018), per tensor over the updates that carry it.

    For a tensor carried by ``k`` updates, the ``floor(trim_fraction * k)`` largest and as many smallest
    values of each coordinate are dropped and the rest averaged; ``trim_fraction`` is in ``[0, 0.5)``, so
    at least one value is always left (``0`` is the plain unweighted mean).
    """
    beta = _check_fraction(trim_fraction)
    out: dict[str, np.ndarray] = {}
    for name, stack in _per_tensor(_check_deltas(deltas)).items():
        cut = math.floor(beta * stack.shape[0])
        kept = np.sort(stack, axis=0)[cut : stack.shape[0] - cut]
        out[name] = kept.mean(axis=0).astype(np.float32)
    return out


def _check_int(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _flatten_all(deltas: Sequence[Delta]) -> np.ndarray:
    """Each update as one float64 vector (its tensors concatenated in name order): shape ``(n, d)``."""
    names = sorted(deltas[0])
    shapes = {name: np.shape(deltas[0][name]) for name in names}
    for i, delta in enumerate(deltas):
        if sorted(delta) != names:
            raise ValueError(
                f"Krum compares whole updates, so every update must carry the same tensors: update {i} has "
                f"{sorted(delta)[:4]}, update 0 has {names[:4]} (use median or trimmed_mean for mixed strategies)"
            )
        for name in names:
            if np.shape(delta[name]) != shapes[name]:
                raise ValueError(f"{name}: update {i} has shape {np.shape(delta[name])} != {shapes[name]}")
    return np.stack([np.concatenate([np.asarray(d[name], dtype=np.float64).ravel() for name in names]) for d in deltas])


def krum_scores(deltas: Sequence[Delta], f: int) -> np.ndarray:
    """Krum score of each update (Blanchard et al. 2017): the sum of its squared L2 distances to its
    ``n - f - 2`` nearest other updates, over all its tensors concatenated. Needs ``n > 2f + 2``."""
    updates = _check_deltas(deltas)
    f = _check_int("krum f", f, 0)
    n = len(updates)
    if n <= 2 * f + 2:
        raise ConfigError(f"Krum needs n > 2f + 2 updates: n={n}, f={f} (at least {2 * f + 3} updates)")
    vectors = _flatten_all(updates)
    distances = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = float(np.sum(np.square(vectors[i] - vectors[j])))
    neighbours = n - f - 2
    return np.array(
        [np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)],
        dtype=np.float64,
    )


def krum_select(deltas: Sequence[Delta], f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` lowest-scoring updates (:func:`krum_scores`), best first; ties by index.

    ``m = 1`` is Krum; ``1 <= m <= n - f``, since more than ``n - f`` would have to take in an attacker.
    """
    scores = krum_scores(deltas, f)
    n = len(scores)
    m = _check_int("krum m", m, 1)
    if m > n - f:
        raise ConfigError(f"krum m must be <= n - f = {n - f} (n={n}, f={f}), got {m}")
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]


def multi_krum(deltas: Sequence[Delta], f: int, m: int) -> dict[str, np.ndarray]:
    """Multi-Krum: the unweighted mean of the ``m`` updates :func:`krum_select` picks (``m = 1``: Krum)."""
    updates = _check_deltas(deltas)
    chosen = [updates[i] for i in krum_select(updates, f, m)]
    return {name: stack.mean(axis=0).astype(np.float32) for name, stack in _per_tensor(chosen).items()}


def update_norm(delta: Delta) -> float:
    """The L2 norm of a whole update (all its tensors together)."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in delta.values()))


def _check_clip(clip: float) -> float:
    ok = not isinstance(clip, bool) and isinstance(clip, int | float | np.floating)
    if not ok or not math.isfinite(float(clip)) or not float(clip) > 0:
        raise ConfigError(f"dp clip norm C must be a finite number > 0, got {clip!r}")
    return float(clip)


def clip_update(delta: Delta, clip: float) -> dict[str, np.ndarray]:
    """``delta`` scaled as a whole by ``min(1, C / ||delta||)``, so its L2 norm is at most ``C``.

    Scaling all tensors together keeps the update's direction (per-tensor clipping would not).
    """
    c = _check_clip(clip)
    norm = update_norm(delta)
    scale = 1.0 if norm <= c else c / norm
    return {name: (np.asarray(v, dtype=np.float64) * scale).astype(np.float32) for name, v in delta.items()}


def _check_noise(noise_multiplier: float) -> float:
    ok = not isinstance(noise_multiplier, bool) and isinstance(noise_multiplier, int | float | np.floating)
    if not ok or not math.isfinite(float(noise_multiplier)) or float(noise_multiplier) < 0:
        raise ConfigError(f"dp noise multiplier z must be a finite number >= 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def dp_noise_std(clip: float, noise_multiplier: float, tau: int) -> float:
    """``σ = z · C / τ``: the noise on the mean of ``τ`` updates each clipped to ``C``."""
    return _check_noise(noise_multiplier) * _check_clip(clip) / _check_int("dp tau", tau, 1)


@dataclass(frozen=True)
class DPResult:
    """A DP-FedAvg aggregate and the privacy parameters it was made with (recorded with the version)."""

    mean: dict[str, np.ndarray]
    clip: float
    noise_multiplier: float
    sigma: float
    tau: int

    def metrics(self) -> dict[str, float]:
        """The parameters as version metrics (floats, as the store keeps them)."""
        return {
            "dp_clip": self.clip,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sigma": self.sigma,
            "dp_tau": float(self.tau),
        }


def dp_fedavg(deltas: Sequence[Delta], clip: float, noise_multiplier: float, rng: np.random.Generator) -> DPResult:
    """Central DP-FedAvg (McMahan et al. 2018): ``sum_k clip(delta_k, C) / τ + N(0, σ²)``, ``σ = z·C/τ``.

    Unweighted, with the fixed denominator ``τ = len(deltas)``: each update moves the mean by at most
    ``C / τ`` (a tensor an update lacks counts as zero), which is what ``σ`` is calibrated to. ``rng``
    is explicit so a run can be reproduced; the (ε, δ) accounting over rounds is left to the caller.
    """
    updates = _check_deltas(deltas)
    c = _check_clip(clip)
    z = _check_noise(noise_multiplier)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"dp_fedavg needs a numpy Generator (np.random.default_rng), got {type(rng).__name__}")
    tau = len(updates)
    sigma = dp_noise_std(c, z, tau)
    sums: dict[str, np.ndarray] = {}
    for delta in updates:
        for name, value in clip_update(delta, c).items():
            arr = value.astype(np.float64)
            if name in sums:
                if sums[name].shape != arr.shape:
                    raise ValueError(f"{name}: shape {arr.shape} != {sums[name].shape}")
                sums[name] += arr
            else:
                sums[name] = arr
    mean = {}
    for name in sorted(sums):  # a fixed order, so a seeded generator gives the same noise per tensor
        noise = rng.normal(0.0, sigma, size=sums[name].shape) if sigma > 0 else 0.0
        mean[name] = (sums[name] / tau + noise).astype(np.float32)
    return DPResult(mean=mean, clip=c, noise_multiplier=z, sigma=sigma, tau=tau)


def check_aggregator(
    name: str,
    *,
    tau: int,
    trim_fraction: float,
    krum_f: int,
    krum_m: int,
    dp_clip: float,
    dp_noise_multiplier: float,
) -> list[str]:
    """Problems with an aggregator configuration for queues of ``tau`` updates (empty when valid)."""
    if name not in AGGREGATORS:
        return [f"aggregator must be one of {AGGREGATORS}, got {name!r}"]
    errors = []
    checks: list[tuple[Callable[..., object], tuple[object, ...]]] = []
    if name == "trimmed_mean":
        checks = [(_check_fraction, (trim_fraction,))]
    elif name == "krum":
        checks = [(_check_int, ("krum f", krum_f, 0))]
    elif name == "multi_krum":
        checks = [(_check_int, ("krum f", krum_f, 0)), (_check_int, ("krum m", krum_m, 1))]
    elif name == "dp_fedavg":
        checks = [(_check_clip, (dp_clip,)), (_check_noise, (dp_noise_multiplier,))]
    for check, args in checks:
        try:
            check(*args)
        except ConfigError as exc:
            errors.append(str(exc))
    if not errors and name in ("krum", "multi_krum"):
        if tau <= 2 * krum_f + 2:
            errors.append(f"{name} with krum_f={krum_f} needs tau > 2f + 2 = {2 * krum_f + 2}, got tau={tau}")
        elif name == "multi_krum" and krum_m > tau - krum_f:
            errors.append(f"multi_krum needs krum_m <= tau - krum_f = {tau - krum_f}, got {krum_m}")
    return errors


def robust_aggregate(
    name: str,
    deltas: Sequence[Delta],
    *,
    trim_fraction: float = 0.1,
    krum_f: int = 1,
    krum_m: int = 1,
    dp_clip: float = 1.0,
    dp_noise_multiplier: float = 1.0,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The pseudo-gradient of rule ``name`` (not ``fedavg``) and the parameters to record with it."""
    if name == "median":
        return coordinate_median(deltas), {}
    if name == "trimmed_mean":
        return trimmed_mean(deltas, trim_fraction), {"trim_fraction": float(trim_fraction)}
    if name in ("krum", "multi_krum"):
        m = 1 if name == "krum" else krum_m
        return multi_krum(deltas, krum_f, m), {"krum_f": float(krum_f), "krum_m": float(m)}
    if name == "dp_fedavg":
        if rng is None:
            raise ConfigError("dp_fedavg needs a numpy Generator")
        result = dp_fedavg(deltas, dp_clip, dp_noise_multiplier, rng)
        return result.mean, result.metrics()
    raise ConfigError(f"robust aggregator must be one of {AGGREGATORS[1:]}, got {name!r}")
