"""LoRA (peft): low-rank adapters on the spec's target modules plus the task head.

Only the adapter matrices and the head train and travel; the base stays frozen, so the update is a
small fraction of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec
from ffm_edge.strategies.base import Strategy, StrategyConfig, register_strategy

__all__ = ["LoraConfig", "LoraStrategy"]


@dataclass(frozen=True)
class LoraConfig(StrategyConfig):
    """LoRA settings; ``None`` takes the model spec's default."""

    r: int | None = field(default=None, metadata={"help": "rank of the adapter matrices"})
    alpha: int | None = field(default=None, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout on the adapter input"})
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "module name suffixes that get adapters"}
    )

    def __post_init__(self) -> None:
        if self.r is not None and self.r < 1:
            raise ConfigError(f"LoRA r must be >= 1, got {self.r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


@register_strategy
class LoraStrategy(Strategy):
    """Adapters via peft; the task head is trained in full (``modules_to_save``)."""

    name = "lora"
    config_class = LoraConfig
    config: LoraConfig

    def prepare(self, module: nn.Module, spec: ModelSpec) -> nn.Module:
        import peft

        cfg = self.config
        peft_config = peft.LoraConfig(
            r=cfg.r or spec.lora.r,
            lora_alpha=cfg.alpha or spec.lora.alpha,
            lora_dropout=spec.lora.dropout if cfg.dropout is None else cfg.dropout,
            target_modules=list(cfg.target_modules or spec.lora.target_modules),
            modules_to_save=list(spec.lora.modules_to_save) or None,
        )
        try:
            return peft.get_peft_model(module, peft_config)
        except ValueError as exc:
            raise ConfigError(f"cannot apply LoRA to {spec.name}: {exc}") from exc
