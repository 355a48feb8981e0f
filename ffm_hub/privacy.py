"""Privacy accounting for ``dp_fedavg``: the (ε, δ) a device has spent over every DP round so far.

One ``dp_fedavg`` round is a Gaussian mechanism: the mean of τ updates, each clipped to L2 norm ``C``, plus
``N(0, σ²)`` with ``σ = z·C/τ``. Adding or removing one device that sent ``k`` of those updates moves the
mean by at most ``k·C/τ``, so the round is ``μ``-GDP (Gaussian differential privacy, Dong, Roth & Su 2019)
with ``μ = k / z``. Gaussian mechanisms compose exactly, also adaptively: T rounds are
``sqrt(Σ μ_t²)``-GDP. That one number is the whole privacy state: each version records it (``dp_mu``), so a
restarted hub, or one that pruned old versions, continues from the newest version.

``μ``-GDP converts to ``(ε, δ)``-DP exactly (Balle & Wang 2018, the analytic Gaussian mechanism)::

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε · Φ(−ε/μ − μ/2)

and :func:`gdp_epsilon` solves it for ε. This is the tight bound, the one a privacy-loss-distribution
accountant such as Google's ``dp_accounting`` converges to for Gaussian mechanisms (the tests check it
against that library); an RDP accountant reports a few percent more. It takes microseconds, so the hub
computes it in its worker after every round.

What it does not cover: devices are not sampled at random, so there is no amplification by sampling (a
device is assumed to take part in every round); the hub is trusted (central DP); and the version
metrics ``num_samples`` and ``devices`` are not privatized.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["compose_mu", "gdp_delta", "gdp_epsilon", "round_mu"]


def round_mu(noise_multiplier: float, device_updates: int = 1) -> float:
    """``μ`` of one dp_fedavg round in which one device sent at most ``device_updates`` of the updates
    (``inf`` when ``z = 0``: no noise, no privacy)."""
    if device_updates < 1:
        raise ValueError(f"device_updates must be >= 1, got {device_updates}")
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    return math.inf if noise_multiplier == 0 else device_updates / noise_multiplier


def compose_mu(mus: Iterable[float]) -> float:
    """``μ`` of the composition of ``μ_t``-GDP mechanisms: ``sqrt(Σ μ_t²)``."""
    return math.sqrt(math.fsum(mu * mu for mu in mus))


def gdp_delta(mu: float, epsilon: float) -> float:
    """The smallest δ for which a ``μ``-GDP mechanism is ``(ε, δ)``-DP."""
    if mu <= 0:
        return 0.0
    from scipy.special import log_ndtr, ndtr  # here, not at import: only a dp_fedavg hub pays for scipy

    # e^ε Φ(b) in log space: Φ(b) underflows long before e^ε overflows matters.
    tail = math.exp(epsilon + float(log_ndtr(-epsilon / mu - mu / 2)))
    return max(0.0, float(ndtr(-epsilon / mu + mu / 2)) - tail)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε for which a ``μ``-GDP mechanism is ``(ε, δ)``-DP (``inf`` for ``μ = inf``)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(mu):
        return math.inf
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    from scipy.optimize import brentq

    high = max(1.0, mu * mu)
    while gdp_delta(mu, high) > delta:  # δ(ε) decreases in ε: bracket the root
        high *= 2
    return float(brentq(lambda eps: gdp_delta(mu, eps) - delta, 0.0, high, xtol=1e-10, rtol=1e-12))
