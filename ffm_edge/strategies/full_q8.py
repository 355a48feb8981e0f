"""Quantized full fine-tuning: every weight trains, with 8-bit optimizer state.

The memory of full fine-tuning is weights + gradients + optimizer state + activations. This strategy
cuts the optimizer state to a quarter with bitsandbytes' blockwise 8-bit ``AdamW8bit`` (tensors under
4,096 elements keep fp32 state), optionally halves weights and gradients with bf16 weights
(``weight_dtype="bf16"``), and recomputes activations in the backward pass (gradient checkpointing, on
by default). Measured on this CPU (torch 2.13, bitsandbytes 0.50.2, all-MiniLM-L6-v2, 22.7M weights;
peaks are ``ru_maxrss`` above the process before training, batch 16 × 64 tokens):

* ``AdamW8bit`` works on the CPU: the state at rest is 44 MB instead of AdamW's 173 MB, and the
  parameters stay within 1e-3 of AdamW's after two steps at lr 1e-3. But its CPU step builds fp32
  temporaries for each tensor (one step on the 11.7M-element word embedding peaked at 217 MB against
  AdamW's 137 MB), so with one tensor holding half of MiniLM the training *peak* was not lower (0.90 GB
  against 0.84 GB); the saving at rest grows with the model, the transient is bounded by its largest
  tensor. The step is also about 4.5× slower (1.7 s against 0.37 s for 22.3M weights).
* bf16 weights train (the loss falls) and are smaller: peak 0.44 GB (bf16, AdamW) and 0.63 GB (bf16,
  AdamW8bit) against 0.84 / 0.90 GB in fp32. bf16 rounds away updates smaller than about 2⁻⁹ of a
  weight, so at small learning rates the loss falls more slowly than in fp32 (6 steps at lr 5e-5:
  0.687 → 0.654 against 0.610). The trainer keeps what a loaded fp32 global version lost in the cast
  (a bf16 residual), so the delta a device sends is its training, not that rounding.
* gradient checkpointing lowered the peak by about a quarter (0.90 → 0.67 GB fp32, 0.63 → 0.50 GB bf16,
  both with AdamW8bit) and made a step about twice as slow.

The update is the delta of every weight, under the model's own parameter names. ``top_k < 1`` keeps
only the largest-magnitude fraction of each tensor's delta (:func:`topk_sparsify`) and sets
:attr:`~FullQ8Strategy.sends_sparse`, so the client sends each such tensor as its kept values and their
uint32 indices (payload format 2, see :mod:`ffm_edge.wire.codec`): the bytes shrink with ``top_k``, to
at most about ``top_k × (1 + 4 / value bytes)`` of dense (measured on MiniLM at top_k 0.1: 0.24 of dense
with int8, 0.10 with fp32; ``benchmarks/sparse_updates.py``). Hubs must run an SDK that reads format 2
before devices send it: upgrade hubs first.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec
from ffm_edge.strategies.base import Strategy, StrategyConfig, register_strategy

__all__ = ["WEIGHT_DTYPES", "FullQ8Config", "FullQ8Strategy", "adamw8bit_problem", "topk_sparsify"]

log = logging.getLogger("ffm.strategies.full_q8")

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIMIZER_FALLBACKS = (None, "adamw")


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"top_k must be a fraction in (0, 1], got {fraction!r}")


def topk_sparsify(delta: Mapping[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """Keep the ``ceil(fraction · n)`` largest-magnitude entries of each tensor and zero the rest.

    Pure: the input arrays are not modified; shapes and dtypes are kept. ``fraction = 1`` returns the
    tensors unchanged (dense). Ties at the threshold are broken arbitrarily, so exactly that many
    entries are kept.
    """
    _check_fraction(fraction)
    out: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        array = np.asarray(value)
        n = array.size
        k = min(n, math.ceil(round(fraction * n, 9)))
        if k >= n:
            out[name] = array.copy()
            continue
        flat = array.reshape(-1)
        keep = np.argpartition(np.abs(flat), n - k)[n - k :]
        sparse = np.zeros_like(flat)
        sparse[keep] = flat[keep]
        out[name] = sparse.reshape(array.shape)
    return out


@dataclass(frozen=True)
class FullQ8Config(StrategyConfig):
    """Full fine-tuning settings. The base must be fp32 (quantized weights cannot train in place)."""

    weight_dtype: str = field(default="fp32", metadata={"help": "dtype of the trained weights: fp32 or bf16"})
    top_k: float = field(default=1.0, metadata={"help": "fraction of each tensor's delta sent (1 = dense)"})
    optimizer_fallback: str | None = field(
        default=None, metadata={"help": "None: fail if AdamW8bit is unusable; 'adamw': fall back to AdamW"}
    )
    gradient_checkpointing: bool = field(
        default=True, kw_only=True, metadata={"help": "recompute activations in backward (on by default here)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_precision != "fp32":
            raise ConfigError(
                f"full_q8 trains every weight, so the base must be fp32 (got {self.base_precision!r}); "
                "use weight_dtype='bf16' for smaller weights"
            )
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"weight_dtype must be one of {tuple(WEIGHT_DTYPES)}, got {self.weight_dtype!r}")
        _check_fraction(self.top_k)
        if self.optimizer_fallback not in OPTIMIZER_FALLBACKS:
            raise ConfigError(
                f"optimizer_fallback must be one of {OPTIMIZER_FALLBACKS}, got {self.optimizer_fallback!r}"
            )


@functools.cache
def adamw8bit_problem() -> str | None:
    """Why bitsandbytes' ``AdamW8bit`` cannot be used here, or ``None`` when it works.

    Checked once per process with one real step on a 4,096-element tensor (the smallest that gets
    8-bit state), so a backend that imports but cannot step is caught before training starts.
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported: {type(exc).__name__}: {exc}"
    try:
        param = nn.Parameter(torch.linspace(-1.0, 1.0, 4096))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        optimizer.step()
        state = optimizer.state[param]
        if state["state1"].dtype != torch.uint8 or not torch.isfinite(param).all():
            return "bitsandbytes AdamW8bit stepped but did not keep 8-bit state"
    except Exception as exc:
        return f"bitsandbytes AdamW8bit failed on this device: {type(exc).__name__}: {exc}"
    return None


@register_strategy
class FullQ8Strategy(Strategy):
    """Every parameter trainable; ``AdamW8bit`` state; fp32 or bf16 weights."""

    name = "full_q8"
    config_class = FullQ8Config
    config: FullQ8Config
    capability_rank = 4
    lr_scale = 0.03

    @property
    def compute_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.config.weight_dtype]

    def prepare(self, module: nn.Module, spec: ModelSpec) -> nn.Module:
        if any(not p.is_floating_point() for p in module.parameters()):
            raise ConfigError(f"full_q8 needs a full-precision base; {spec.name} has quantized weights")
        module = module.to(self.compute_dtype)
        module.requires_grad_(True)
        return module

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        params = list(params)
        problem = adamw8bit_problem()
        if problem is None:
            import bitsandbytes as bnb

            optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
            return optimizer
        if self.config.optimizer_fallback != "adamw":
            raise ConfigError(
                f"full_q8 needs bitsandbytes' 8-bit AdamW: {problem} (optimizer_fallback='adamw' allows AdamW)"
            )
        log.warning("full_q8: %s; falling back to AdamW (fp32 optimizer state)", problem)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def finalize_update(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.config.top_k >= 1.0:
            return dict(delta)
        return topk_sparsify(delta, self.config.top_k)

    @property
    def sends_sparse(self) -> bool:
        """Top-k deltas travel as values + indices (dense ones as today)."""
        return self.config.top_k < 1.0
