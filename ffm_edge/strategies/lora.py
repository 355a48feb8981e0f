"""LoRA (peft): low-rank adapters on the spec's target modules plus the task head.

Only the adapter matrices and the head train and travel; the base stays frozen, so the update is a
small fraction of the model. With ``base_precision="int8"`` or ``"nf4"`` the frozen base is loaded
quantized by bitsandbytes (the head stays fp32) and the adapters train on top of it: that is
**QLoRA** (nf4) / LoRA on an 8-bit base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec
from ffm_edge.strategies.base import Strategy, StrategyConfig, register_strategy

if TYPE_CHECKING:
    import peft

__all__ = ["LoraConfig", "LoraStrategy", "is_kbit_model"]


@dataclass(frozen=True)
class LoraConfig(StrategyConfig):
    """LoRA settings; ``None`` takes the model spec's default.

    ``base_precision`` (keyword-only, from :class:`StrategyConfig`): ``fp32`` for plain LoRA, ``nf4``
    for QLoRA, ``int8`` for LoRA on an 8-bit base. ``gradient_checkpointing`` trades time for
    activation memory.
    """

    r: int | None = field(default=None, metadata={"help": "rank of the adapter matrices"})
    alpha: int | None = field(default=None, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout on the adapter input"})
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "module name suffixes that get adapters"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is not None and self.r < 1:
            raise ConfigError(f"LoRA r must be >= 1, got {self.r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("LoRA target_modules, when given, must name at least one module")


def is_kbit_model(module: nn.Module) -> bool:
    """Whether ``module`` was loaded quantized by bitsandbytes (8-bit or 4-bit)."""
    return bool(getattr(module, "is_loaded_in_8bit", False) or getattr(module, "is_loaded_in_4bit", False))


@register_strategy
class LoraStrategy(Strategy):
    """Adapters via peft; the task head is trained in full (``modules_to_save``).

    On a quantized base (QLoRA with nf4, or int8) the base is first passed through peft's
    ``prepare_model_for_kbit_training`` without its gradient-checkpointing step (the trainer enables
    checkpointing itself, non-reentrant). On a CPU with an fp32 compute dtype that call only freezes the
    base: it upcasts fp16/bf16 parameters, and there are none, so it adds no memory (measured on
    all-MiniLM-L6-v2: +0.0 MB resident, same training peak).
    """

    name = "lora"
    config_class = LoraConfig
    config: LoraConfig
    capability_rank = 3
    peft_adapter = True

    def peft_config(self, spec: ModelSpec) -> peft.LoraConfig:
        """The peft config this strategy applies to ``spec``'s model (also written into saved adapters)."""
        import peft

        cfg = self.config
        return peft.LoraConfig(
            r=cfg.r or spec.lora.r,
            lora_alpha=cfg.alpha or spec.lora.alpha,
            lora_dropout=spec.lora.dropout if cfg.dropout is None else cfg.dropout,
            target_modules=list(cfg.target_modules or spec.lora.target_modules),
            modules_to_save=list(spec.lora.modules_to_save) or None,
        )

    def prepare(self, module: nn.Module, spec: ModelSpec) -> nn.Module:
        import peft

        if is_kbit_model(module):
            module = peft.prepare_model_for_kbit_training(module, use_gradient_checkpointing=False)
        try:
            return peft.get_peft_model(module, self.peft_config(spec))
        except ValueError as exc:
            raise ConfigError(f"cannot apply LoRA to {spec.name}: {exc}") from exc
