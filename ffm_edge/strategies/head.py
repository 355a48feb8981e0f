"""Head only: the paper's "lightweight adapter head" — a frozen backbone, only the task head trains.

The head modules are the spec's ``lora.modules_to_save`` (``classifier`` for BERT, ``score`` for Llama,
``_fc`` for EfficientNet), or the config's ``modules_to_save``. The backbone can be loaded quantized
(``base_precision="int8"`` / ``"nf4"``); the loader keeps the head in full precision, which this
strategy checks. The update is the head's weights only, and gradients stop at the head, so training
needs almost no activation memory beyond the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec
from ffm_edge.strategies.base import Strategy, StrategyConfig, head_module_names, register_strategy

__all__ = ["HeadConfig", "HeadStrategy"]


@dataclass(frozen=True)
class HeadConfig(StrategyConfig):
    """Head-only settings; ``modules_to_save=None`` takes the spec's ``lora.modules_to_save``."""

    modules_to_save: tuple[str, ...] | None = field(
        default=None, metadata={"help": "names (or name suffixes) of the head modules that train"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modules_to_save is not None and (
            not self.modules_to_save or not all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ConfigError(f"modules_to_save, when given, must name at least one module, got {self.modules_to_save}")


@register_strategy
class HeadStrategy(Strategy):
    """Freeze everything but the task head (plain ``requires_grad``; no peft wrapper)."""

    name = "head"
    config_class = HeadConfig
    config: HeadConfig
    capability_rank = 1
    lr_scale = 3.0

    def heads(self, spec: ModelSpec) -> tuple[str, ...]:
        """The head module names for ``spec``."""
        return self.config.modules_to_save or spec.lora.modules_to_save

    def validate_spec(self, spec: ModelSpec) -> None:
        if not self.heads(spec):
            raise ConfigError(f"strategy 'head' needs lora.modules_to_save in spec {spec.name!r} (the task head)")

    def prepare(self, module: nn.Module, spec: ModelSpec) -> nn.Module:
        self.validate_spec(spec)
        heads = self.heads(spec)
        names = head_module_names(module, heads)
        if not names:
            raise ConfigError(f"no module of {spec.name} matches the head names {list(heads)}")
        module.requires_grad_(False)
        submodules = dict(module.named_modules())
        for name in names:
            for pname, param in submodules[name].named_parameters():
                if not param.is_floating_point():
                    raise ConfigError(
                        f"head {name}.{pname} is quantized ({param.dtype}); load the base with the head unquantized"
                    )
                param.requires_grad_(True)
        return module
