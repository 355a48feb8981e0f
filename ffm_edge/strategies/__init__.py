"""Training strategies, registered by name (see :mod:`ffm_edge.strategies.base`)."""

from ffm_edge.strategies.base import STRATEGIES, Strategy, StrategyConfig, get_strategy, register_strategy
from ffm_edge.strategies.lora import LoraConfig, LoraStrategy

__all__ = [
    "STRATEGIES",
    "LoraConfig",
    "LoraStrategy",
    "Strategy",
    "StrategyConfig",
    "get_strategy",
    "register_strategy",
]
