"""The strategy registry: what part of a model a device trains.

Each strategy has one validated config dataclass and registers itself by name, in the style of peft's
tuners. ``prepare`` turns a loaded base model into one whose trainable parameters are exactly the
tensors that travel to the hub.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ffm_edge.errors import ConfigError
from ffm_edge.spec import ModelSpec

__all__ = ["STRATEGIES", "Strategy", "StrategyConfig", "get_strategy", "register_strategy"]


@dataclass(frozen=True)
class StrategyConfig:
    """Base of every strategy config; subclasses validate in ``__post_init__``."""


class Strategy(ABC):
    """Turns a base model into a trainable one for this strategy."""

    name: ClassVar[str]
    config_class: ClassVar[type[StrategyConfig]]

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"strategy {self.name!r} takes a {self.config_class.__name__}")

    @abstractmethod
    def prepare(self, module: nn.Module, spec: ModelSpec) -> nn.Module:
        """Return the model to train; only the strategy's tensors may require grad."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for logs and manifests."""
        return {"strategy": self.name, **self.config.__dict__}


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
        config = cls.config_class(**kwargs)
    return cls(config)
