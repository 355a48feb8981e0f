"""The strategy registry: what part of a model a device trains.

Each strategy has one validated config dataclass and registers itself by name, in the style of peft's
tuners. ``prepare`` turns a loaded base model into one whose trainable parameters are exactly the
tensors that travel to the hub. Optional backends (peft, bitsandbytes) are imported inside the methods
that need them, so importing the registry stays cheap.

Strategies, by ``capability_rank`` (how much of the model they can change; a planner prefers higher
ranks when the device can afford them):

====== ========== =====================================================================
rank   name       what trains (and travels)
====== ========== =====================================================================
4      full_q8    every weight, with 8-bit optimizer state (:mod:`.full_q8`)
3      lora       LoRA adapters and the task head; QLoRA on an int8/nf4 base (:mod:`.lora`)
2      prompt     soft-prompt embeddings and the task head (:mod:`.prompt`)
1      head       only the task head, on a frozen (possibly quantized) base (:mod:`.head`): the last
                  resort, since it keeps no graph through the backbone and so needs the least memory
====== ========== =====================================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec

__all__ = [
    "BASE_PRECISIONS",
    "STRATEGIES",
    "Strategy",
    "StrategyConfig",
    "get_strategy",
    "head_module_names",
    "register_strategy",
]

BASE_PRECISIONS = ("fp32", "int8", "nf4")
"""Precisions a frozen base can be loaded in (``int8``/``nf4``: bitsandbytes, head unquantized)."""


@dataclass(frozen=True)
class StrategyConfig:
    """Base of every strategy config; subclasses validate in ``__post_init__`` (and call ``super()``).

    The two fields here are keyword-only, so subclasses keep their own positional fields first.
    """

    base_precision: str = field(
        default="fp32",
        kw_only=True,
        metadata={"help": "precision of the frozen base: fp32, int8 or nf4 (bitsandbytes; the head stays fp32)"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        kw_only=True,
        metadata={"help": "recompute activations in the backward pass (less memory, more time)"},
    )

    def __post_init__(self) -> None:
        if self.base_precision not in BASE_PRECISIONS:
            raise ConfigError(f"base_precision must be one of {BASE_PRECISIONS}, got {self.base_precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")


class Strategy(ABC):
    """Turns a base model into a trainable one for this strategy.

    What the trainer asks of a strategy: ``base_precision`` (how to load the base), ``validate_spec``
    (fail fast, before loading), ``prepare`` (wrap and freeze), ``compute_dtype`` (the dtype of floating
    inputs), ``gradient_checkpointing``, ``make_optimizer``, and ``finalize_update`` (a last transform
    of the delta an edge sends, e.g. top-k sparsification); the client also reads ``sends_sparse``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[StrategyConfig]]
    capability_rank: ClassVar[int] = 0
    #: Multiplier on the model spec's learning rate (tuned for LoRA) when the app sets none: soft prompts
    #: and a lone head want larger steps, full fine-tuning much smaller ones.
    lr_scale: ClassVar[float] = 1.0
    """How capable the strategy is: full_q8 (4) > lora (3) > head (2) > prompt (1)."""
    peft_adapter: ClassVar[bool] = False
    """Whether the prepared model is a peft adapter model (saved in peft's own format)."""

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"strategy {self.name!r} takes a {self.config_class.__name__}")

    # -- what the trainer needs -----------------------------------------------------------------------
    @property
    def base_precision(self) -> str:
        """The precision the base model should be loaded in: ``fp32``, ``int8`` or ``nf4``."""
        return self.config.base_precision

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the trainer should enable gradient checkpointing (when the model supports it)."""
        return self.config.gradient_checkpointing

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype floating inputs (images) are cast to before the forward pass."""
        return torch.float32

    def validate_spec(self, spec: ModelSpec) -> None:
        """Raise :class:`ConfigError` if this strategy cannot apply to ``spec`` (checked before loading)."""
        return None

    @abstractmethod
    def prepare(self, module: nn.Module, spec: ModelSpec) -> nn.Module:
        """Return the model to train; only the strategy's tensors may require grad."""

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """A fresh optimizer over ``params`` (default: torch's AdamW)."""
        return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)

    def finalize_update(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The delta an edge sends, from the raw one (trained minus global); identity by default."""
        return dict(delta)

    @property
    def sends_sparse(self) -> bool:
        """Whether :meth:`finalize_update` leaves mostly zeros, so the client encodes the update sparse
        (values + indices, payload format 2, which only upgraded hubs read); False by default."""
        return False

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for logs and manifests."""
        return {"strategy": self.name, **self.config.__dict__}


def head_module_names(module: nn.Module, heads: Iterable[str]) -> list[str]:
    """Names of the modules of ``module`` that ``heads`` name, matched as peft's ``modules_to_save`` are.

    A head key matches a module whose qualified name equals it or ends with ``"." + key``.
    """
    keys = tuple(heads)
    return [
        name for name, _ in module.named_modules() if name and any(name == k or name.endswith("." + k) for k in keys)
    ]


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by name."""
    if cls.name in STRATEGIES:
        raise ConfigError(f"strategy {cls.name!r} registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str, config: StrategyConfig | None = None, **kwargs: Any) -> Strategy:
    """Instantiate a registered strategy, from a config object or from config keyword arguments."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    if config is None:
        try:
            config = cls.config_class(**kwargs)
        except TypeError as exc:  # an unknown keyword: a typo must not pass silently
            raise ConfigError(f"strategy {name!r}: {exc}") from exc
    elif kwargs:
        raise ConfigError("give either a config object or config keyword arguments, not both")
    return cls(config)
